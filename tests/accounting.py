"""The end-to-end accounting checks, shared by the ``airflow dags test`` e2e test and the
deployment tests: every candidate is counted exactly once at every stage and in every subset,
one done lineage record per (stage, shard), and the downstream DAGs' outputs exist."""

from __future__ import annotations

from collections import Counter, defaultdict

import pyarrow.parquet as pq

from laion_tasks import layout, storage
from laion_tasks.config import Settings
from laion_tasks.lineage import Lineage

SHARD_STAGES = ("extract", "download", "clip", "tag")


def parquet_rows(uris: list[str]) -> int:
    total = 0
    for uri in uris:
        with storage.local_copy(uri) as path:
            total += pq.ParquetFile(path).metadata.num_rows
    return total


def done_shard_records(lineage: Lineage, snap: str) -> int:
    """How many done records the per-shard stages have; a re-run that skips adds none."""
    return len([r for r in lineage.runs(snap) if r["status"] == "done" and r["stage"] in SHARD_STAGES])


def assert_snapshot_accounting(settings: Settings, lineage: Lineage, snap: str) -> int:
    """The snapshot DAG's outputs account for every candidate once; returns the candidate count."""
    root = settings.storage.root
    runs = lineage.runs(snap)
    done = Counter((r["stage"], r["shard_id"]) for r in runs if r["status"] == "done")
    assert done and max(done.values()) == 1, done
    unfinished = [r for r in runs if r["status"] in ("failed", "running")]
    assert not unfinished, unfinished

    funnel: dict[str, Counter[str]] = defaultdict(Counter)
    for row in lineage.funnel(snap):
        funnel[row.stage][row.outcome] += row.count

    candidates = parquet_rows(storage.list_uris(layout.candidates_dir(root, snap), ".parquet"))
    assert candidates == funnel["extract"]["kept"] > 0
    shard_rows = parquet_rows(storage.list_uris(layout.shards_dir(root, snap), ".parquet"))
    assert shard_rows == candidates, "regrouping neither loses nor duplicates candidates"
    image_meta = storage.list_uris(storage.join(root, snap, "images"), ".parquet")
    assert parquet_rows(image_meta) == candidates
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
            assert parquet_rows(parts) == manifest["counts"].get("kept", 0)
    assert read_manifest(root, snap, "laion-aesthetics-6.5")["status"] == "unavailable"
    assert storage.exists(storage.join(layout.card_dir(root, snap), "README.md"))
    assert_verified(settings, lineage, snap)
    return candidates


def assert_verified(settings: Settings, lineage: Lineage, snap: str) -> None:
    """`laion verify` finds nothing wrong, and the DAG's own verify task recorded a done run."""
    from laion_tasks.verify import verify_snapshot

    assert [p.line() for p in verify_snapshot(settings, snap, lineage)] == []
    runs = lineage.runs(snap, "verify")
    assert runs and runs[-1]["status"] == "done", runs[-1:] 


def assert_downstream_outputs(settings: Settings, lineage: Lineage, snap: str) -> None:
    """The Asset-triggered chain ran: kNN index, and train -> zero-shot eval -> metrics in the card."""
    root = settings.storage.root
    train_subset = settings.train.subset
    model_dir = layout.model_dir(root, snap, train_subset)
    assert storage.exists(layout.checkpoint_uri(model_dir))
    assert storage.exists(storage.join(model_dir, "eval", "zeroshot.json"))
    card_text = storage.read_text(storage.join(layout.card_dir(root, snap), "README.md"))
    assert f"Zero-shot evaluation of CLIP trained on `{train_subset}`" in card_text
    index_files = storage.list_uris(layout.index_dir(root, snap, settings.index.subsets[0]))
    assert any(u.endswith("index.json") for u in index_files)
    stages_done = {r["stage"] for r in lineage.runs(snap) if r["status"] == "done"}
    assert {"index", "train", "eval"} <= stages_done
