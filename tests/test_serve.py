"""Query service: text/image/embedding queries, filters, dedup, limits, export, URL queries, plugin."""

from __future__ import annotations

import importlib.util
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from laion_tasks import layout
from laion_tasks.config import IndexConfig
from laion_tasks.serve import create_app
from laion_tasks.stages.index import build_index
from tests.index_fixtures import SNAPSHOT, SUBSET, Generated, generate, tiny_encoder, tiny_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Generated, str]:
    root = tmp_path_factory.mktemp("serve")
    generated = generate(root, tiny_encoder(), shards=3, rows_per_shard=40)
    out = layout.index_dir(str(root), SNAPSHOT, SUBSET)
    build_index(generated.embedding_uris, generated.clip_uris, out, IndexConfig(), generated.subset_uris)
    return generated, out


@pytest.fixture(scope="module")
def client(built: tuple[Generated, str]) -> TestClient:
    return TestClient(create_app(built[1], tiny_settings(max_k=50, max_upload_bytes=200_000)))


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 48) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_text_query_returns_the_captioned_sample_first(client: TestClient, built: tuple[Generated, str]) -> None:
    generated, _ = built
    for key, caption in [kc for kc in generated.captions.items() if kc[0] not in generated.unscored_keys][5:12]:
        body = client.get("/api/search", params={"text": caption, "k": 5}).json()
        top = body["results"][0]
        assert top["key"] == key and top["TEXT"] == caption
        assert top["score"] == pytest.approx(1.0, abs=2e-3)
        for field in ("URL", "TEXT", "similarity", "WIDTH", "HEIGHT", "punsafe", "pwatermark", "aesthetic", "score"):
            assert field in top
        assert body["count"] == len(body["results"]) == 5
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)


def test_embedding_and_post_queries(client: TestClient, built: tuple[Generated, str]) -> None:
    generated, out = built
    key, caption = [kc for kc in generated.captions.items() if kc[0] not in generated.unscored_keys][20]
    vec = tiny_encoder()([caption])[0]
    by_embedding = client.post("/api/search", json={"embedding": vec.tolist(), "k": 3}).json()
    by_text = client.post("/api/search", json={"text": caption, "k": 3}).json()
    assert by_embedding["results"][0]["key"] == by_text["results"][0]["key"] == key
    info = client.get("/api/info").json()
    assert info["count"] == len(generated.captions) and info["dim"] == 64 and info["index_key"] == "Flat"


def test_image_upload_query(client: TestClient) -> None:
    resp = client.post("/api/search/image", files={"file": ("q.png", png_bytes(), "image/png")}, data={"k": "7"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["count"] == 7


def test_filters_are_applied(client: TestClient) -> None:
    text = "a photo of a red cat"
    body = client.post("/api/search", json={"text": text, "k": 20, "max_punsafe": 0.5}).json()
    assert body["results"] and all(r["punsafe"] is not None and r["punsafe"] <= 0.5 for r in body["results"])
    body = client.post("/api/search", json={"text": text, "k": 20, "min_aesthetic": 6.0}).json()
    assert body["results"] and all(r["aesthetic"] >= 6.0 for r in body["results"])
    body = client.post("/api/search", json={"text": text, "k": 20, "language": "DE"}).json()
    assert body["results"] and all(r["LANGUAGE"] == "de" for r in body["results"])
    unfiltered = client.post("/api/search", json={"text": text, "k": 20}).json()["results"]
    assert any(r["LANGUAGE"] != "de" for r in unfiltered)


def test_unscored_images_are_never_shown(client: TestClient, built: tuple[Generated, str]) -> None:
    generated, _ = built
    unscored = [k for k in generated.captions if k in generated.unscored_keys]
    assert unscored
    for key in unscored[:4]:
        caption = generated.captions[key]
        for body in ({"text": caption, "k": 50}, {"text": caption, "k": 50, "dedup": False}):
            results = client.post("/api/search", json=body).json()["results"]
            assert results and all(r["punsafe"] is not None for r in results)
            assert key not in {r["key"] for r in results}
    exported = client.post("/api/export?format=json", json={"text": generated.captions[unscored[0]], "k": 50}).json()
    assert exported and all(r["punsafe"] is not None for r in exported)


def test_near_duplicates_are_removed(client: TestClient, built: tuple[Generated, str]) -> None:
    generated, _ = built
    first, second = generated.duplicate_pair
    caption = generated.captions[first]
    deduped = client.post("/api/search", json={"text": caption, "k": 10}).json()["results"]
    raw = client.post("/api/search", json={"text": caption, "k": 10, "dedup": False}).json()["results"]
    assert {first, second} <= {r["key"] for r in raw}
    assert len({first, second} & {r["key"] for r in deduped}) == 1
    assert len(deduped) == 10  # the gap is refilled from further candidates


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"text": "cat", "k": 51}, 400, "over the limit"),
        ({"text": "cat", "k": 0}, 422, "greater than or equal"),
        ({"text": "cat", "embedding": [0.1] * 64}, 400, "exactly one"),
        ({}, 400, "exactly one"),
        ({"embedding": [0.1] * 63}, 400, "expects 64"),
        ({"embedding": [0.0] * 64}, 400, "non-zero"),
        ({"text": "   "}, 400, "empty"),
        ({"text": "cat", "max_punsafe": 2}, 422, "less than or equal"),
        ({"text": "cat", "color": "red"}, 422, "Extra inputs"),
        ({"image_url": "http://127.0.0.1/x.png"}, 403, "disabled"),
    ],
)
def test_bad_queries_get_clear_4xx(client: TestClient, body: dict, status: int, fragment: str) -> None:
    resp = client.post("/api/search", json=body)
    assert resp.status_code == status, resp.text
    assert fragment in json.dumps(resp.json()["detail"])


def test_upload_limits_and_bad_images(client: TestClient) -> None:
    big = client.post("/api/search/image", files={"file": ("big.png", b"\0" * 300_000, "image/png")})
    assert big.status_code == 413 and "max_upload_bytes" in big.json()["detail"]
    junk = client.post("/api/search/image", files={"file": ("junk.png", b"not an image", "image/png")})
    assert junk.status_code == 400 and "decode" in junk.json()["detail"]


def test_export_is_downloader_input(client: TestClient) -> None:
    query = {"text": "a photo of a blue dog", "k": 12}
    resp = client.post("/api/export?format=parquet", json=query)
    assert resp.status_code == 200
    table = pq.read_table(io.BytesIO(resp.content))
    assert table.num_rows == 12 and {"url", "alt", "score", "WIDTH", "HEIGHT"} <= set(table.column_names)
    assert "key" not in table.column_names
    results = client.post("/api/search", json=query).json()["results"]
    assert table.column("url").to_pylist() == [r["URL"] for r in results]
    rows = client.post("/api/export?format=json", json=query).json()
    assert [r["alt"] for r in rows] == [r["TEXT"] for r in results]


def test_page_and_missing_index(tmp_path: Path) -> None:
    app_client = TestClient(create_app(str(tmp_path / "nothing-here"), tiny_settings()))
    page = app_client.get("/")
    assert page.status_code == 200 and "LAION search" in page.text and "static/airflow.css" in page.text
    assert app_client.get("/static/airflow.css").headers["content-type"].startswith("text/css")
    assert app_client.get("/static/search.html").status_code == 404
    info = app_client.get("/api/info")
    assert info.status_code == 503 and "laion index" in info.json()["detail"]
    assert app_client.get("/api/search", params={"text": "cat"}).status_code == 503


def test_filter_on_missing_column_is_a_400(built: tuple[Generated, str], tmp_path: Path) -> None:
    generated, _ = built
    out = str(tmp_path / "all")
    build_index(generated.embedding_uris, generated.clip_uris, out, IndexConfig())
    c = TestClient(create_app(out, tiny_settings()))
    resp = c.post("/api/search", json={"text": "cat", "max_punsafe": 0.3})
    assert resp.status_code == 400 and "no punsafe column" in resp.json()["detail"]
    # Without any safety score, nothing is shown, filter or not.
    resp = c.post("/api/search", json={"text": "cat"})
    assert resp.status_code == 400 and "no safety scores" in resp.json()["detail"]


@pytest.fixture
def image_server() -> Iterator[str]:
    body = png_bytes((10, 200, 10))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_queries_go_through_the_ssrf_guard(built: tuple[Generated, str], image_server: str) -> None:
    _, out = built
    guarded = TestClient(create_app(out, tiny_settings(allow_url_queries=True)))
    refused = guarded.post("/api/search", json={"image_url": f"{image_server}/img.png"})
    assert refused.status_code == 400 and "refused" in refused.json()["detail"]
    bad_scheme = guarded.post("/api/search", json={"image_url": "file:///etc/passwd"})
    assert bad_scheme.status_code == 400 and "scheme" in bad_scheme.json()["detail"]

    settings = tiny_settings(allow_url_queries=True)
    settings.download.allow_private_networks = True  # the offline demo / test switch
    open_client = TestClient(create_app(out, settings))
    ok = open_client.post("/api/search", json={"image_url": f"{image_server}/redirect", "k": 4})
    assert ok.status_code == 200, ok.text
    assert ok.json()["count"] == 4


def _load_plugin(monkeypatch: pytest.MonkeyPatch, index_dir: str):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LAION_SEARCH_INDEX_DIR", index_dir)
    monkeypatch.setenv("LAION_CLIP__ENGLISH__MODEL", "laion-tiny-clip")
    monkeypatch.setenv("LAION_CLIP__ENGLISH__PRETRAINED", "")
    spec = importlib.util.spec_from_file_location("laion_search_plugin_under_test", REPO / "plugins" / "laion_search_plugin.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_airflow_plugin_requires_airflow_auth(monkeypatch: pytest.MonkeyPatch, built: tuple[Generated, str], tmp_path: Path) -> None:
    pytest.importorskip("airflow")
    from airflow.api_fastapi.core_api.security import get_user

    generated, out = built
    module = _load_plugin(monkeypatch, out)
    plugin = module.LaionSearchPlugin
    [entry] = plugin.fastapi_apps
    assert entry["url_prefix"] == "/laion-search"
    [view] = plugin.external_views
    assert view["href"] == "laion-search/" and view["destination"] == "nav"

    app = entry["app"]
    anonymous = TestClient(app)
    assert anonymous.get("/").status_code == 401
    assert anonymous.get("/api/search", params={"text": "cat"}).status_code == 401
    # A forged session cookie is checked by Airflow's auth manager (as in the API server).
    from airflow.api_fastapi import app as airflow_app

    monkeypatch.setattr(airflow_app._AuthManagerState, "instance", airflow_app.create_auth_manager())
    forged = TestClient(app, cookies={"_token": "not-a-jwt"})
    assert forged.get("/").status_code == 403

    app.dependency_overrides[get_user] = lambda: object()  # what a valid Airflow session resolves to
    logged_in = TestClient(app)
    caption = next(iter(generated.captions.values()))
    assert logged_in.get("/").status_code == 200
    assert logged_in.get("/api/search", params={"text": caption, "k": 2}).json()["count"] == 2

    # No index yet: the plugin still loads and explains how to build one.
    empty = _load_plugin(monkeypatch, str(tmp_path / "no-index")).LaionSearchPlugin.fastapi_apps[0]["app"]
    empty.dependency_overrides[get_user] = lambda: object()
    info = TestClient(empty).get("/api/info")
    assert info.status_code == 503 and "laion index" in info.json()["detail"]
