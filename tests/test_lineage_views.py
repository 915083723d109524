"""The lineage/card views served in the Airflow UI plugin."""

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from laion_tasks import layout, storage
from laion_tasks.config import load_settings
from laion_tasks.lineage import Lineage
from laion_tasks.runner import StageRun, run_stage
from laion_tasks.serve import lineage_queries as q
from laion_tasks.serve.lineage_app import create_lineage_app
from laion_tasks.stage import ShardStats

SNAP = "CC-MAIN-2024-10"
XSS = "<script>alert(1)</script>"


def _stats(**counts: int) -> ShardStats:
    stats = ShardStats()
    for k, v in counts.items():
        stats.add(k.replace("__", ":"), v)
    return stats


def _fail(message: str):  # type: ignore[no-untyped-def]
    def boom() -> ShardStats:
        raise OSError(message)

    return boom


@pytest.fixture
def lineage_db(tmp_path: Path) -> tuple[Lineage, object]:
    settings = load_settings(environ={}, overrides={"storage": {"root": str(tmp_path)}, "lineage": {"url": f"sqlite:///{tmp_path / 'l.db'}"}})
    lin = Lineage(settings.lineage.url)
    lin.ensure_snapshot(SNAP, str(tmp_path))

    def run(stage: str, shard: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            run_stage(lin, StageRun(SNAP, stage, shard, f"s3://cc/{shard}", "d"), fn)
        except OSError:
            pass

    run("extract", "w1", lambda: _stats(kept=10, drop__alt_too_short=3))
    run("extract", "w2", _fail(f"truncated gzip {XSS}"))  # still failing
    run("download", "00000", _fail("connection reset"))
    run("download", "00000", lambda: _stats(success=6, fail__timeout=4))  # fixed by a retry
    run("download", "00001", lambda: _stats(success=1))
    card = layout.card_dir(str(tmp_path), SNAP)
    storage.write_text(
        storage.join(card, "README.md"),
        f"# Dataset card\n\n![funnel](funnel.png)\n\n| a | b |\n|---|---:|\n| x | 1 |\n\n{XSS} [s](../subsets/all/README.md)"
        " [bad](javascript:alert(1))\n",
    )
    storage.write_bytes(storage.join(card, "funnel.png"), b"\x89PNG fake")
    storage.write_text(storage.join(layout.subset_dir(str(tmp_path), SNAP, "all"), "README.md"), "# all\n\n![s](similarity.png)\n")
    return lin, settings


@pytest.fixture
def client(lineage_db) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(create_lineage_app(lineage_db[1]))


def test_stage_status_counts_latest_attempts(lineage_db) -> None:  # type: ignore[no-untyped-def]
    lin = lineage_db[0]
    by_stage = {s.stage: s for s in q.stage_status(lin, SNAP)}
    assert list(by_stage) == ["extract", "download"]  # pipeline order
    ext, dl = by_stage["extract"], by_stage["download"]
    assert (ext.shards, ext.done, ext.failed, ext.attempts, ext.failed_attempts, ext.retried_done) == (2, 1, 1, 2, 1, 0)
    assert (dl.shards, dl.done, dl.failed, dl.attempts, dl.failed_attempts, dl.retried_done) == (2, 2, 0, 3, 1, 1)
    failures = q.shards_with_failures(lin, SNAP)
    assert [(f.stage, f.shard_id, f.status, f.attempts) for f in failures] == [("extract", "w2", "failed", 1), ("download", "00000", "done", 2)]
    assert "connection reset" in failures[1].error


def test_snapshot_page_funnel_chart_status_and_failures(client: TestClient) -> None:
    assert SNAP in client.get("/").text
    funnel = client.get("/api/funnel/" + SNAP).json()
    assert ("extract", "kept", 10) in {(r["stage"], r["outcome"], r["count"]) for r in funnel}
    resp = client.get("/snapshot/" + SNAP)
    page = resp.text
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    svg = page[page.index("<svg class='funnel'") : page.index("</svg>", page.index("<svg class='funnel'"))]
    assert svg.count("class='c-pass'") == 2 and "class='c-fail'" in svg and "class='c-drop'" in svg
    assert "13 rows" in svg and "11 rows" in svg  # extract saw 13 rows, download 11
    assert "1 failing, 1 fixed by a retry" in page
    assert "truncated gzip &lt;script&gt;" in page and XSS not in page
    assert "connection reset" in page and "Dataset card" in page
    assert "static/airflow.css" in page and "https://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert client.get("/static/airflow.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/theme.js").status_code == 200
    failed = client.get(f"/api/shards/{SNAP}", params={"status": "failed"}).json()
    assert [r["shard_id"] for r in failed] == ["w2", "00000"]
    assert [s["failed"] for s in client.get(f"/api/stages/{SNAP}").json()] == [1, 0]
    tab = client.get("/dag/laion_snapshot_CC_MAIN_2024_10", follow_redirects=False)
    assert tab.status_code == 303 and tab.headers["location"] == "../snapshot/" + SNAP
    assert "has no snapshot" in client.get("/dag/%3Cb%3Eother").text and "<b>other" not in client.get("/dag/%3Cb%3Eother").text


def test_card_is_rendered_escaped_and_paths_are_confined(client: TestClient) -> None:
    page = client.get(f"/files/{SNAP}/card/README.md").text
    assert "<h1>Dataset card</h1>" in page and "<table>" in page
    assert "<img src=\"funnel.png\"" in page and "&lt;script&gt;" in page and XSS not in page
    assert "javascript:" not in re.sub(r"\[bad\]\(javascript:[^)]*\)", "", page)
    assert "href=\"../subsets/all/README.md\"" in page
    assert "../../../static/airflow.css" in page
    sub = client.get(f"/files/{SNAP}/subsets/all/README.md")
    assert sub.status_code == 200 and "subset all" in sub.text and "../../../../static/theme.js" in sub.text
    assert client.get(f"/files/{SNAP}/card/funnel.png").headers["content-type"] == "image/png"
    assert client.get(f"/files/{SNAP}/card/../../l.db").status_code in (400, 404)
    assert client.get(f"/files/{SNAP}/card/%2E%2E/%2E%2E/l.db").status_code == 400
    assert client.get("/files/%2E%2E/card/README.md").status_code in (400, 404)
    assert client.get(f"/files/{SNAP}/images/x.tar").status_code == 400
    assert client.get("/api/funnel/CC-MAIN-1999-01").status_code == 404
    assert client.get(f"/api/shards/{SNAP}", params={"status": "bogus"}).status_code == 422


def test_plugin_imports_without_an_api_server() -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "plugins" / "laion_lineage_plugin.py"
    spec = importlib.util.spec_from_file_location("laion_lineage_plugin", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    plugin = module.LaionLineagePlugin
    assert plugin.fastapi_apps[0]["url_prefix"] == "/laion-lineage"
    assert plugin.external_views[0]["destination"] == "nav"


@pytest.fixture
def traversal_root(tmp_path: Path) -> tuple[Path, Any]:
    """Storage root one level down, with a secret file where ``..`` would lead."""
    root = tmp_path / "root"
    settings = load_settings(environ={}, overrides={"storage": {"root": str(root)}, "lineage": {"url": f"sqlite:///{tmp_path / 'l.db'}"}})
    Lineage(settings.lineage.url).ensure_snapshot("CC-MAIN-2024-10", str(root))
    storage.write_text(storage.join(layout.card_dir(str(root), "CC-MAIN-2024-10"), "README.md"), "# card\n")
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text("SECRET outside the root\n")
    return tmp_path, create_lineage_app(settings)


@pytest.mark.parametrize("dots", ["..", "%2E%2E", "%2e%2e", ".%2E"])
def test_dot_dot_in_every_path_parameter_is_refused(traversal_root, dots: str) -> None:
    from tests.loopback import raw_request, serve_asgi

    _, app = traversal_root
    targets = [
        f"/api/funnel/{dots}",
        f"/api/shards/{dots}",
        f"/api/stages/{dots}",
        f"/snapshot/{dots}",
        f"/files/{dots}/card/README.md",
        f"/files/CC-MAIN-2024-10/card/{dots}/{dots}/l.db",
        f"/files/CC-MAIN-2024-10/{dots}/CC-MAIN-2024-10/card/README.md",
        f"/files/CC-MAIN-2024-10/card/sub/{dots}",
    ]
    with serve_asgi(app) as addr:
        assert raw_request(addr, "GET", "/files/CC-MAIN-2024-10/card/README.md")[0] == 200
        for target in targets:
            status, body = raw_request(addr, "GET", target)
            assert status == 400 and b"invalid" in body, (target, status, body[:200])
            assert b"SECRET" not in body
