"""The shared look of the LAION pages inside Airflow: ``web/airflow.css`` and ``web/theme.js``.

Both apps (search, lineage) serve these two files themselves at ``static/<name>``, so a page
works offline, under any URL prefix, and with a Content-Security-Policy of ``'self'``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import Response

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_FILES = {"airflow.css": "text/css", "theme.js": "text/javascript"}


def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise HTTPException(404, "no such file")
    return Response((WEB_DIR / name).read_bytes(), media_type=STATIC_FILES[name], headers={"Cache-Control": "max-age=300"})
