"""Index build: accounting of every row, index choice, ANN recall, memory-mapped reading, S3, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_tasks import layout, storage
from laion_tasks.config import IndexConfig
from laion_tasks.stage import StageError
from laion_tasks.stages.index import INDEX_FILE, MANIFEST_FILE, METADATA_FILE, build_index, plan_index
from tests.index_fixtures import SNAPSHOT, SUBSET, Generated, generate, tiny_encoder


@pytest.fixture(scope="module")
def encoder():  # type: ignore[no-untyped-def]
    return tiny_encoder()


@pytest.fixture
def generated(tmp_path: Path, encoder) -> Generated:  # type: ignore[no-untyped-def]
    return generate(tmp_path, encoder)


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 fixed centres: CLIP embeddings are clustered, uniform noise is not."""
    centres = np.random.default_rng(1234).standard_normal((50, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_subset_index_accounts_for_every_row(generated: Generated) -> None:
    out = layout.index_dir(str(generated.root), SNAPSHOT, SUBSET)
    stats = build_index(generated.embedding_uris, generated.clip_uris, out, IndexConfig(), generated.subset_uris)

    kept = len(generated.captions)
    assert stats.counts["kept"] == kept
    assert stats.counts["drop:no_embedding"] == len(generated.no_embedding_keys)
    assert stats.counts["drop:not_in_subset"] == len(generated.not_in_subset_keys)
    assert stats.counts["fail:not_in_clip"] == generated.missing_from_clip
    subset_rows = pq.read_table(generated.subset_uris[0]).num_rows
    assert kept + stats.counts["drop:no_embedding"] + stats.counts["fail:not_in_clip"] == subset_rows

    manifest = json.loads(Path(out, MANIFEST_FILE).read_text())
    assert manifest["count"] == kept and manifest["plan"]["key"] == "Flat"
    meta = pq.read_table(Path(out, METADATA_FILE))
    assert meta.column("id").to_pylist() == list(range(kept))
    assert set(meta.column("key").to_pylist()) == set(generated.captions)
    for col in ("URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "aesthetic", "LANGUAGE", "uid"):
        assert col in meta.column_names


def test_text_queries_find_their_sample(generated: Generated, encoder) -> None:  # type: ignore[no-untyped-def]
    from laion_tasks.serve.searcher import KnnIndex

    out = layout.index_dir(str(generated.root), SNAPSHOT, SUBSET)
    build_index(generated.embedding_uris, generated.clip_uris, out, IndexConfig(), generated.subset_uris)
    knn = KnnIndex(out)
    keys = [k for k in generated.captions if k not in generated.duplicate_pair]
    vectors = encoder([generated.captions[k] for k in keys])
    _, ids = knn.search(vectors, 1)
    found = knn.metadata.rows(ids[:, 0], ["key"]).column("key").to_pylist()
    assert found == keys


def test_plan_follows_size_and_memory_budget() -> None:
    import faiss

    small = plan_index(1000, 512, IndexConfig())
    assert small.key == "Flat"
    roomy = plan_index(1_000_000, 512, IndexConfig(memory_budget_gb=4))
    assert roomy.key == "IVF1024,PQ64x4fs,Refine(SQfp16)"
    tight = plan_index(10_000_000, 512, IndexConfig(memory_budget_gb=6))
    assert tight.key == "IVF4096_HNSW32,PQ64x4fs,Refine(SQ8)"
    tiny_budget = plan_index(10_000_000, 512, IndexConfig(memory_budget_gb=1))
    assert tiny_budget.key == "IVF4096_HNSW32,PQ64x4fs"  # no re-rank codes fit: PQ only
    assert plan_index(500, 64, IndexConfig(index_key="HNSW32,SQfp16")).key == "HNSW32,SQfp16"
    for plan in (roomy, tight, tiny_budget):
        assert faiss.index_factory(512, plan.key, faiss.METRIC_INNER_PRODUCT).d == 512


def _write_clip_shards(root: Path, vectors: np.ndarray, shards: int) -> tuple[list[str], list[str]]:
    import pyarrow as pa

    emb_uris, clip_uris = [], []
    for s, chunk in enumerate(np.array_split(vectors, shards)):
        shard = layout.shard_name(s)
        clip_uri = layout.clip_parquet_uri(str(root), SNAPSHOT, shard)
        Path(clip_uri).parent.mkdir(parents=True, exist_ok=True)
        n = len(chunk)
        pq.write_table(
            pa.table({"key": [f"{shard}{i:05d}" for i in range(n)], "uid": [f"u{s}-{i}" for i in range(n)], "has_embedding": [True] * n}),
            clip_uri,
        )
        np.save(layout.clip_image_emb_uri(str(root), SNAPSHOT, shard), chunk.astype(np.float16))
        emb_uris.append(layout.clip_image_emb_uri(str(root), SNAPSHOT, shard))
        clip_uris.append(clip_uri)
    return emb_uris, clip_uris


def test_ivf_index_recall_against_exact(tmp_path: Path) -> None:
    from laion_tasks.serve.searcher import KnnIndex

    vectors = clustered(12_000, 64)
    emb_uris, clip_uris = _write_clip_shards(tmp_path, vectors, 3)
    out = str(tmp_path / "index")
    stats = build_index(emb_uris, clip_uris, out, IndexConfig(flat_max_vectors=1000))
    assert stats.counts == {"kept": 12_000}
    assert stats.extra["index_key"].startswith("IVF") and "Refine" in stats.extra["index_key"]

    knn = KnnIndex(out, nprobe=16)  # a query-time knob: not the build's
    queries = clustered(200, 64, seed=1)
    stored = vectors.astype(np.float16).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    exact = np.argsort(-(queries @ stored.T), axis=1)[:, :10]
    _, ids = knn.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, ids)])
    assert recall >= 0.9, recall
    assert knn.vectors(ids[0, :3]).shape == (3, 64)


def test_index_of_all_clip_rows_without_subset(generated: Generated) -> None:
    out = str(generated.root / "all")
    stats = build_index(generated.embedding_uris, generated.clip_uris, out, IndexConfig())
    total = sum(pq.read_table(u).num_rows for u in generated.clip_uris)
    assert stats.counts["kept"] + stats.counts["drop:no_embedding"] == total
    meta = pq.read_table(Path(out, METADATA_FILE))
    assert "has_embedding" in meta.column_names and all(meta.column("has_embedding").to_pylist())


def test_misaligned_embeddings_are_refused(generated: Generated) -> None:
    np.save(generated.embedding_uris[1], np.zeros((3, 64), dtype=np.float16))
    with pytest.raises(StageError, match="embedding rows"):
        build_index(generated.embedding_uris, generated.clip_uris, str(generated.root / "bad"), IndexConfig())
    assert not Path(generated.root / "bad" / MANIFEST_FILE).exists()


def test_subset_without_key_column_is_refused(generated: Generated) -> None:
    table = pq.read_table(generated.subset_uris[0]).drop_columns(["key"])
    pq.write_table(table, generated.subset_uris[0])
    with pytest.raises(StageError, match="'key' missing"):
        build_index(generated.embedding_uris, generated.clip_uris, str(generated.root / "bad"), IndexConfig(), generated.subset_uris)


def test_build_to_s3_and_serve_from_it(generated: Generated, s3_root: str) -> None:
    from laion_tasks.serve.searcher import KnnIndex

    out = layout.index_dir(s3_root, SNAPSHOT, SUBSET)
    stats = build_index(generated.embedding_uris, generated.clip_uris, out, IndexConfig(), generated.subset_uris)
    for name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE):
        assert storage.exists(storage.join(out, name))
    knn = KnnIndex(out)
    assert knn.count == stats.counts["kept"]


def test_cli_builds_the_subset_index(generated: Generated, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from laion_tasks.cli import app

    from laion_tasks.lineage import Lineage

    config = tmp_path / "laion.yaml"
    config.write_text(f"storage:\n  root: {generated.root}\nlineage:\n  url: sqlite:///{tmp_path / 'lineage.db'}\n")
    args = ["index", "--snapshot", SNAPSHOT, "--subset", SUBSET, "-c", str(config)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["kept"] == len(generated.captions)
    manifest = Path(layout.index_dir(str(generated.root), SNAPSHOT, SUBSET), MANIFEST_FILE)
    assert manifest.exists()
    # recorded as `laion run index` records it, and skipped while current
    lineage = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}")
    assert [(r["shard_id"], r["status"], r["output_uri"]) for r in lineage.runs(SNAPSHOT, "index")] == [(SUBSET, "done", str(manifest))]
    assert json.loads(CliRunner().invoke(app, args).output) == {"skipped": True}
    # every sample with an embedding, into a directory of our choosing
    everything = CliRunner().invoke(app, ["index", "--snapshot", SNAPSHOT, "--out-dir", str(tmp_path / "all"), "-c", str(config)])
    assert everything.exit_code == 0, everything.output
    with_embedding = sum(sum(pq.read_table(u, columns=["has_embedding"]).column(0).to_pylist()) for u in generated.clip_uris)
    assert json.loads(everything.output)["counts"] == {"kept": with_embedding, "drop:no_embedding": 6}
    assert (tmp_path / "all" / MANIFEST_FILE).exists()
    missing = CliRunner().invoke(app, ["index", "--snapshot", SNAPSHOT, "--subset", "nope", "-c", str(config)])
    assert missing.exit_code == 2 and "subset 'nope' has no Parquet files" in missing.output
