"""The search service: a FastAPI app over one index directory.

Endpoints (relative, so the same app works standalone and mounted under Airflow):

* ``GET  /``                   the search page (laion_tasks/web/search.html)
* ``GET  /api/info``           index size, type and metadata columns (503 until an index exists)
* ``GET  /api/search?text=``   text query (also ``POST /api/search`` with JSON: text | embedding | image_url)
* ``POST /api/search/image``   multipart image upload
* ``POST /api/export?format=parquet|json``   the same query's results as a downloader input file
* ``GET  /openapi.json``       the API's schema; like every route, behind the ``dependencies`` (no /docs, /redoc)

The index is opened on first use and re-checked while missing, so an Airflow webserver
started before the first index build picks it up without a restart.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from laion_tasks.config import Settings
from laion_tasks.serve.limits import BodyLimitMiddleware
from laion_tasks.serve.schema import NO_BUILTIN_DOCS, add_openapi_route
from laion_tasks.serve.theme import static_file
from laion_tasks.serve.searcher import Filters, IndexNotReady, KnnIndex, QueryError

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MAX_TEXT_CHARS = 2000
EXPORT_RENAME = {"URL": "url", "TEXT": "alt"}


class SearchRequest(BaseModel):
    """Exactly one of ``text``, ``embedding`` or ``image_url``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    embedding: list[float] | None = None
    image_url: str | None = Field(None, max_length=4096)
    k: int | None = Field(None, ge=1)
    max_punsafe: float | None = Field(None, ge=0.0, le=1.0)
    min_aesthetic: float | None = None
    language: str | None = Field(None, max_length=16)
    dedup: bool = True


class SearchState:
    """Lazily opened index and text/image encoders shared by all requests."""

    def __init__(self, index_dir: str, settings: Settings) -> None:
        self.index_dir = index_dir
        self.settings = settings
        self._index: KnnIndex | None = None
        self._lock = threading.Lock()

    def index(self) -> KnnIndex:
        if self._index is None:
            with self._lock:
                if self._index is None:
                    try:
                        self._index = KnnIndex(self.index_dir, self.settings.index.nprobe, self.settings.index.k_factor)
                    except IndexNotReady as exc:
                        raise HTTPException(
                            503,
                            f"{exc}. Build it with `laion index --snapshot ... --subset ...` or the index DAG.",
                        ) from exc
        return self._index

    def clip(self):  # type: ignore[no-untyped-def]
        from laion_tasks.models.clip import ModelUnavailableError, cached_clip

        cfg = self.settings.clip.english
        try:
            model = cached_clip(cfg.model, cfg.pretrained, cfg.checkpoint, self.settings.clip.device, self.settings.clip.seed)
        except ModelUnavailableError as exc:
            raise HTTPException(503, f"text/image encoder unavailable: {exc}") from exc
        dim = self.index().dim
        if model.embed_dim != dim:
            raise HTTPException(
                503,
                f"encoder {cfg.model} makes {model.embed_dim}-d embeddings but the index holds {dim}-d vectors: "
                "set clip.english to the model that embedded the images",
            )
        return model

    def text_vector(self, text: str) -> np.ndarray:
        from laion_tasks.models.clip import encode_texts

        if not text.strip():
            raise HTTPException(400, "empty text query")
        return encode_texts(self.clip(), [text]).numpy()

    def image_vector(self, data: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        from laion_tasks.models.clip import encode_images

        max_pixels = self.settings.download.max_image_pixels
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise HTTPException(400, f"image has {img.width}x{img.height} pixels, over the {max_pixels} limit")
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise HTTPException(400, f"could not decode the image: {exc}") from exc
        model = self.clip()
        return encode_images(model, model.preprocess(rgb).unsqueeze(0)).numpy()

    def embedding_vector(self, values: list[float]) -> np.ndarray:
        vec = np.asarray(values, dtype=np.float32)
        dim = self.index().dim
        if vec.shape != (dim,):
            raise HTTPException(400, f"embedding has {vec.size} values, the index expects {dim}")
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(vec).all() or norm == 0.0:
            raise HTTPException(400, "embedding must be finite and non-zero")
        return (vec / norm)[None, :]

    def run(self, vector: np.ndarray, req: SearchRequest) -> list[dict[str, Any]]:
        serve = self.settings.serve
        k = req.k or serve.default_k
        if k > serve.max_k:
            raise HTTPException(400, f"k={k} is over the limit of {serve.max_k} (serve.max_k)")
        filters = Filters(req.max_punsafe, req.min_aesthetic, (req.language or "").strip() or None)
        try:
            return self.index().query(vector, k, filters, req.dedup, serve.dedup_threshold, serve.max_candidates)
        except QueryError as exc:
            raise HTTPException(400, str(exc)) from exc


async def fetch_query_image(url: str, settings: Settings) -> bytes:
    """Fetch an image for a by-URL query through the downloader's SSRF guard.

    Every hop is checked (``check_url``) and every host name is resolved by
    ``GuardedResolver``, which refuses non-public addresses at connect time.
    """
    import aiohttp
    from yarl import URL

    from laion_tasks.net.ssrf import GuardedResolver, SSRFBlocked, check_url

    allow_private = settings.download.allow_private_networks
    limit = settings.serve.max_upload_bytes
    timeout = aiohttp.ClientTimeout(total=settings.serve.url_fetch_timeout_s)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private=allow_private))
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for _ in range(settings.download.max_redirects + 1):
                check_url(url, allow_private)
                async with session.get(
                    url, allow_redirects=False, headers={"User-Agent": settings.download.user_agent}
                ) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        url = str(resp.url.join(URL(resp.headers["Location"])))
                        continue
                    if resp.status != 200:
                        raise HTTPException(400, f"fetching {url}: HTTP {resp.status}")
                    return await _read_capped(resp, url, limit)
            raise HTTPException(400, "too many redirects fetching the query image")
    except SSRFBlocked as exc:
        raise HTTPException(400, f"image URL refused: {exc}") from exc
    except ValueError as exc:
        raise HTTPException(400, f"invalid image URL: {exc}") from exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, SSRFBlocked):
            raise HTTPException(400, f"image URL refused: {cause}") from exc
        raise HTTPException(400, f"fetching {url} failed: {type(exc).__name__}: {exc}") from exc


async def _read_capped(resp: Any, url: str, limit: int) -> bytes:
    """The whole body, read chunk by chunk up to ``limit``; 413 (naming the limit) when it is larger.

    ``StreamReader.read(n)`` returns what is buffered, not n bytes, so one read would
    silently truncate an image that arrives in several segments.
    """
    too_big = HTTPException(413, f"image at {url} is over {limit} bytes (serve.max_upload_bytes)")
    if resp.content_length is not None and resp.content_length > limit:
        raise too_big
    data = bytearray()
    while True:
        chunk = await resp.content.read(min(1 << 16, limit + 1 - len(data)))
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise too_big


def _export_response(results: list[dict[str, Any]], fmt: str) -> Response:
    """Results as the downloader's input: ``url`` + ``alt`` (LAION's URL/TEXT renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    skip = {"key"}  # a new download assigns its own keys
    rows = [{EXPORT_RENAME.get(k, k): v for k, v in r.items() if k not in skip} for r in results]
    if fmt == "json":
        import orjson

        return Response(
            orjson.dumps(rows),
            media_type="application/json",
            headers={"Content-Disposition": 'attachment; filename="laion-search.json"'},
        )
    table = pa.Table.from_pylist(rows) if rows else pa.table({"url": pa.array([], pa.string()), "alt": pa.array([], pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return Response(
        buf.getvalue(),
        media_type="application/vnd.apache.parquet",
        headers={"Content-Disposition": 'attachment; filename="laion-search.parquet"'},
    )


def create_app(index_dir: str, settings: Settings, dependencies: Sequence[Any] = ()) -> FastAPI:
    """The search app for ``index_dir``. ``dependencies`` (e.g. Airflow's auth check) guard every route."""
    state = SearchState(index_dir, settings)
    app = FastAPI(
        title="LAION search",
        description=f"kNN search over {index_dir}",
        dependencies=[d if hasattr(d, "dependency") else Depends(d) for d in dependencies],
        **NO_BUILTIN_DOCS,
    )
    add_openapi_route(app)
    app.state.search = state
    # Counted while streaming: a chunked or lying body is cut off at the limit (413).
    app.add_middleware(
        BodyLimitMiddleware, upload_bytes=settings.serve.max_upload_bytes, other_bytes=settings.serve.max_request_bytes
    )

    async def vector_for(req: SearchRequest) -> np.ndarray:
        given = [name for name in ("text", "embedding", "image_url") if getattr(req, name) is not None]
        if len(given) != 1:
            raise HTTPException(400, f"give exactly one of text, embedding, image_url (got {given or 'none'})")
        if req.text is not None:
            return await run_in_threadpool(state.text_vector, req.text)
        if req.embedding is not None:
            return await run_in_threadpool(state.embedding_vector, req.embedding)
        if not settings.serve.allow_url_queries:
            raise HTTPException(403, "image-by-URL queries are disabled (serve.allow_url_queries)")
        data = await fetch_query_image(str(req.image_url), settings)
        return await run_in_threadpool(state.image_vector, data)

    async def answer(req: SearchRequest, vector: np.ndarray, started: float) -> dict[str, Any]:
        results = await run_in_threadpool(state.run, vector, req)
        return {"count": len(results), "took_ms": round((time.perf_counter() - started) * 1000, 2), "results": results}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((WEB_DIR / "search.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        return static_file(name)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        index = state.index()
        return {
            "index_dir": index_dir,
            "count": index.count,
            "dim": index.dim,
            "index_key": index.manifest.get("plan", {}).get("key"),
            "columns": index.metadata.columns,
            "text_model": settings.clip.english.model,
            "max_k": settings.serve.max_k,
            "default_k": settings.serve.default_k,
            "allow_url_queries": settings.serve.allow_url_queries,
        }

    @app.post("/api/search")
    async def search(req: SearchRequest) -> dict[str, Any]:
        started = time.perf_counter()
        return await answer(req, await vector_for(req), started)

    @app.get("/api/search")
    async def search_get(
        text: str = Query(..., max_length=MAX_TEXT_CHARS),
        k: int | None = Query(None, ge=1),
        max_punsafe: float | None = Query(None, ge=0.0, le=1.0),
        min_aesthetic: float | None = None,
        language: str | None = Query(None, max_length=16),
        dedup: bool = True,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        req = SearchRequest(text=text, k=k, max_punsafe=max_punsafe, min_aesthetic=min_aesthetic, language=language, dedup=dedup)
        return await answer(req, await vector_for(req), started)

    @app.post("/api/search/image")
    async def search_image(
        request: Request,
        file: UploadFile = File(...),
        k: int | None = Form(None, ge=1),
        max_punsafe: float | None = Form(None, ge=0.0, le=1.0),
        min_aesthetic: float | None = Form(None),
        language: str | None = Form(None, max_length=16),
        dedup: bool = Form(True),
    ) -> dict[str, Any]:
        started = time.perf_counter()
        limit = settings.serve.max_upload_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"upload is over {limit} bytes (serve.max_upload_bytes)")
        if not data:
            raise HTTPException(400, "empty upload")
        req = SearchRequest(k=k, max_punsafe=max_punsafe, min_aesthetic=min_aesthetic, language=language, dedup=dedup)
        vector = await run_in_threadpool(state.image_vector, data)
        return await answer(req, vector, started)

    @app.post("/api/export")
    async def export(req: SearchRequest, format: Literal["parquet", "json"] = "parquet") -> Response:
        vector = await vector_for(req)
        results = await run_in_threadpool(state.run, vector, req)
        return _export_response(results, format)

    return app
