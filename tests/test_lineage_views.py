"""The lineage/card views served in the Airflow UI plugin."""

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from laion_tasks import layout, storage
from laion_tasks.config import load_settings
from laion_tasks.lineage import Lineage, StageRun, run_stage
from laion_tasks.serve.lineage_app import create_lineage_app
from laion_tasks.stage import ShardStats


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = load_settings(environ={}, overrides={"storage": {"root": str(tmp_path)}, "lineage": {"url": f"sqlite:///{tmp_path / 'l.db'}"}})
    lineage = Lineage(settings.lineage.url)
    lineage.ensure_snapshot("CC-MAIN-2024-10", str(tmp_path))
    stats = ShardStats()
    stats.add("kept", 10)
    stats.add("drop:alt_too_short", 3)
    run_stage(lineage, StageRun("CC-MAIN-2024-10", "extract", "w1", "s3://cc/w1.wat.gz", "d"), lambda: stats)

    def boom() -> ShardStats:
        raise OSError("truncated gzip in s3://cc/w2.wat.gz")

    with pytest.raises(OSError):
        run_stage(lineage, StageRun("CC-MAIN-2024-10", "extract", "w2", "s3://cc/w2.wat.gz", "d"), boom)
    card = layout.card_dir(str(tmp_path), "CC-MAIN-2024-10")
    storage.write_text(storage.join(card, "README.md"), "# Dataset card\n\nfunnel: 10 kept <b>\n")
    storage.write_bytes(storage.join(card, "funnel.png"), b"\x89PNG fake")
    return TestClient(create_lineage_app(settings))


def test_snapshot_list_funnel_and_failures(client: TestClient) -> None:
    assert "CC-MAIN-2024-10" in client.get("/").text
    funnel = client.get("/api/funnel/CC-MAIN-2024-10").json()
    assert {(r["stage"], r["outcome"], r["count"]) for r in funnel} == {("extract", "kept", 10), ("extract", "drop:alt_too_short", 3)}
    page = client.get("/snapshot/CC-MAIN-2024-10").text
    assert "truncated gzip" in page and "Dataset card" in page
    failed = client.get("/api/shards/CC-MAIN-2024-10", params={"status": "failed"}).json()
    assert [r["shard_id"] for r in failed] == ["w2"]


def test_card_is_served_escaped_and_paths_are_confined(client: TestClient) -> None:
    page = client.get("/card/CC-MAIN-2024-10/README.md")
    assert page.status_code == 200 and "&lt;b&gt;" in page.text and "funnel.png" in page.text
    assert client.get("/card/CC-MAIN-2024-10/funnel.png").headers["content-type"] == "image/png"
    assert client.get("/card/CC-MAIN-2024-10/../../l.db").status_code in (400, 404)
    assert client.get("/api/funnel/CC-MAIN-1999-01").status_code == 404
    assert client.get("/api/shards/CC-MAIN-2024-10", params={"status": "bogus"}).status_code == 422


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
        f"/snapshot/{dots}",
        f"/card/{dots}/README.md",
        f"/card/CC-MAIN-2024-10/{dots}/{dots}/l.db",
        f"/card/CC-MAIN-2024-10/{dots}/CC-MAIN-2024-10/card/README.md",
        f"/card/CC-MAIN-2024-10/sub/{dots}",
    ]
    with serve_asgi(app) as addr:
        assert raw_request(addr, "GET", "/card/CC-MAIN-2024-10/README.md")[0] == 200
        for target in targets:
            status, body = raw_request(addr, "GET", target)
            assert status == 400 and b"invalid" in body, (target, status, body[:200])
            assert b"SECRET" not in body
