"""End to end: ``airflow dags test`` of the snapshot DAG on the fixture crawl, against real
PostgreSQL (Airflow metadata and lineage) and S3 (moto_server), then the accounting:
every candidate is accounted for exactly once at every stage and in every subset.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_tasks import demo, layout, storage
from laion_tasks.config import load_settings
from laion_tasks.lineage import Lineage

pytestmark = pytest.mark.slow


def _rows(uris: list[str]) -> int:
    total = 0
    for uri in uris:
        with storage.local_copy(uri) as path:
            total += pq.ParquetFile(path).metadata.num_rows
    return total


def test_snapshot_dag_on_postgres_and_s3(tmp_path: Path, postgres, moto_server, s3_root: str) -> None:  # type: ignore[no-untyped-def]
    lineage_url = postgres.create_database("e2e_lineage")
    airflow_url = postgres.create_database("e2e_airflow")
    env = demo.prepare(
        tmp_path / "work",
        storage_root=s3_root,
        lineage_url=lineage_url,
        airflow_db_url=airflow_url,
        extra_config={"storage": {"s3_endpoint_url": moto_server.url}},
        n_wat=2,
        pages_per_wat=6,
    )
    try:
        demo.run_snapshot_dag(env)
        settings = load_settings(env.config_path, environ={})
        storage.configure(settings.storage)
        snap, root = demo.DEMO_CRAWL, settings.storage.root
        lineage = Lineage(lineage_url)

        # one done record per (stage, shard)
        runs = lineage.runs(snap)
        done = Counter((r["stage"], r["shard_id"]) for r in runs if r["status"] == "done")
        assert done and max(done.values()) == 1, done
        assert not [r for r in runs if r["status"] in ("failed", "running")]

        funnel: dict[str, Counter[str]] = defaultdict(Counter)
        for row in lineage.funnel(snap):
            funnel[row.stage][row.outcome] += row.count

        candidates = _rows(storage.list_uris(layout.candidates_dir(root, snap), ".parquet"))
        assert candidates == funnel["extract"]["kept"] > 0
        shard_rows = _rows(storage.list_uris(layout.shards_dir(root, snap), ".parquet"))
        assert shard_rows == candidates, "regrouping neither loses nor duplicates candidates"
        image_meta = [u for u in storage.list_uris(storage.join(root, snap, "images"), ".parquet")]
        assert _rows(image_meta) == candidates
        assert sum(funnel["download"].values()) == candidates, funnel["download"]
        assert funnel["download"]["success"] > 0
        assert sum(funnel["clip"].values()) == candidates, funnel["clip"]
        assert sum(funnel["tag"].values()) == candidates, funnel["tag"]

        # every subset accounts for every downloaded row exactly once
        from laion_tasks.stages.curate import read_manifest

        for name in settings.curate.subsets:
            manifest = read_manifest(root, snap, name)
            assert manifest is not None, name
            assert sum(manifest["counts"].values()) == candidates, (name, manifest["counts"])
            if manifest["status"] == "ok":
                parts = storage.list_uris(layout.subset_dir(root, snap, name), ".parquet")
                assert _rows(parts) == manifest["counts"].get("kept", 0)
        assert read_manifest(root, snap, "laion-aesthetics-6.5")["status"] == "unavailable"
        assert storage.exists(storage.join(layout.card_dir(root, snap), "README.md"))

        # a re-run skips every finished shard: no new done records for the shard stages
        before = len([r for r in lineage.runs(snap) if r["status"] == "done" and r["stage"] in ("extract", "download", "clip", "tag")])
        demo.run_snapshot_dag(env)
        after = len([r for r in lineage.runs(snap) if r["status"] == "done" and r["stage"] in ("extract", "download", "clip", "tag")])
        assert after == before

        # the Asset-triggered chain: kNN index, and train -> zero-shot eval -> metrics in the card
        demo.run_downstream_dags(env)
        train_subset = settings.train.subset
        model_dir = storage.join(layout.models_dir(root, snap), train_subset)
        assert storage.exists(storage.join(model_dir, "epoch_latest.pt"))
        assert storage.exists(storage.join(model_dir, "eval", "zeroshot.json"))
        card_text = storage.read_text(storage.join(layout.card_dir(root, snap), "README.md"))
        assert f"Zero-shot evaluation of CLIP trained on `{train_subset}`" in card_text
        index_files = storage.list_uris(layout.index_dir(root, snap, settings.index.subsets[0]))
        assert any(u.endswith("index.json") for u in index_files)
        stages_done = {r["stage"] for r in lineage.runs(snap) if r["status"] == "done"}
        assert {"index", "train", "eval"} <= stages_done
    finally:
        env.stop()
