"""Snapshot-wide dedup: exact (url, alt), sha256, near-duplicate embeddings, across shards and buckets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_tasks.config import DedupConfig
from laion_tasks.stages.dedup import dedup_all, near_duplicate_pointers

DIM = 32


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def write_shard(root: Path, shard: str, rows: list[dict]) -> tuple[str, str, str]:
    """rows: dicts with url, caption, sha (str or None), emb (vector or None)."""
    root.mkdir(parents=True, exist_ok=True)
    keys = [f"{shard}{i:04d}" for i in range(len(rows))]
    images = root / f"{shard}.parquet"
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "uid": [hashlib.sha256(f"{r['url']}\x00{r['caption']}".encode()).hexdigest()[:32] for r in rows],
                "url": [r["url"] for r in rows],
                "caption": [r["caption"] for r in rows],
                "status": ["success" if r.get("sha") else "failed_to_download" for r in rows],
                "sha256": [hashlib.sha256(r["sha"].encode()).hexdigest() if r.get("sha") else None for r in rows],
            }
        ),
        images,
    )
    has = [r.get("emb") is not None for r in rows]
    clip = root / f"{shard}.clip.parquet"
    pq.write_table(pa.table({"key": keys, "has_embedding": has}), clip)
    emb = np.stack([r["emb"] if r.get("emb") is not None else np.zeros(DIM) for r in rows]).astype(np.float16)
    np.save(root / f"{shard}.img.npy", emb)
    return str(images), str(clip), str(root / f"{shard}.img.npy")


def verdicts(out_dir: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted(out_dir.glob("*.parquet")):
        for r in pq.read_table(path).to_pylist():
            rows[r["key"]] = r
    return rows


@pytest.fixture()
def two_shards(tmp_path):
    rng = np.random.default_rng(0)
    base = [unit(rng.normal(size=DIM)) for _ in range(8)]
    near = unit(base[2] + 0.05 * unit(rng.normal(size=DIM)))  # cosine ~0.999 with base[2]
    a = [
        {"url": "http://a/0.jpg", "caption": "a cat", "sha": "img0", "emb": base[0]},
        {"url": "http://a/1.jpg", "caption": "a dog", "sha": "img1", "emb": base[1]},
        {"url": "http://a/2.jpg", "caption": "a cow", "sha": "img2", "emb": base[2]},
        {"url": "http://a/3.jpg", "caption": "no image", "sha": None, "emb": None},
    ]
    b = [
        {"url": "http://a/0.jpg", "caption": "a cat", "sha": "img0", "emb": base[0]},  # url_alt dup of A0
        {"url": "http://b/1.jpg", "caption": "same bytes", "sha": "img1", "emb": base[1]},  # sha256 dup of A1
        {"url": "http://b/2.jpg", "caption": "re-encoded cow", "sha": "img2b", "emb": near},  # near dup of A2
        {"url": "http://b/3.jpg", "caption": "unique", "sha": "img3", "emb": base[3]},
        {"url": "http://a/3.jpg", "caption": "no image", "sha": None, "emb": None},  # url_alt dup, no image
        {"url": "http://b/5.jpg", "caption": "mirror", "sha": "img5", "emb": base[5]},  # sha dup of B6 ...
        {"url": "http://b/5.jpg", "caption": "mirror", "sha": "img6", "emb": base[6]},  # ... url_alt dup of B5
    ]
    shards = {"000000": write_shard(tmp_path / "in", "000000", a), "000001": write_shard(tmp_path / "in", "000001", b)}
    return shards


@pytest.mark.parametrize("buckets", [1, 4, 16])
def test_dedup_across_shards_and_buckets(tmp_path, two_shards, buckets):
    config = DedupConfig(buckets=buckets, near_dup_threshold=0.95, cluster_size=1)
    stats = dedup_all(two_shards, str(tmp_path / f"work{buckets}"), str(tmp_path / f"out{buckets}"), config)
    v = verdicts(tmp_path / f"out{buckets}")
    assert len(v) == 11  # one row per input row
    expected = {
        "0000010000": ("0000000000", "url_alt"),
        "0000010001": ("0000000001", "sha256"),
        "0000010004": ("0000000003", "url_alt"),
        "0000010006": ("0000010005", "url_alt"),
    }
    # near-dups meet through their near_dup_probes nearest k-means clusters, even with one cluster per vector
    expected["0000010002"] = ("0000000002", "near_embedding")
    removed = {k: (r["dup_of_key"], r["dup_reason"]) for k, r in v.items() if r["dup_reason"]}
    assert removed == expected
    for k, r in v.items():
        if r["dup_reason"] is None:
            assert r["dup_of"] is None and r["dup_of_key"] is None
        else:
            assert r["dup_of"] == v[r["dup_of_key"]]["uid"] and r["dup_of_shard"] == r["dup_of_key"][:6]
    assert stats.counts["kept"] == 11 - len(expected) and stats.counts["drop:dup_url_alt"] == 3
    # output order is the input order, per shard
    assert pq.read_table(tmp_path / f"out{buckets}" / "000001.parquet").column("key").to_pylist() == [
        f"000001{i:04d}" for i in range(7)
    ]


def test_one_probe_with_a_cell_per_vector_misses_the_near_pair(tmp_path, two_shards):
    """The documented cost of clustering: near-dups in different clusters are not compared."""
    config = DedupConfig(buckets=16, near_dup_probes=1, cluster_size=1)
    dedup_all(two_shards, str(tmp_path / "work"), str(tmp_path / "out"), config)
    v = verdicts(tmp_path / "out")
    assert v["0000010002"]["dup_reason"] is None
    assert v["0000010001"]["dup_reason"] == "sha256"


def test_chains_resolve_to_the_final_representative(tmp_path):
    rows_a = [{"url": "http://z/0.jpg", "caption": "first", "sha": "shared", "emb": None}]
    rows_b = [
        {"url": "http://y/0.jpg", "caption": "second", "sha": "shared", "emb": None},  # sha dup of A0
        {"url": "http://y/0.jpg", "caption": "second", "sha": "other", "emb": None},  # url_alt dup of B0
    ]
    shards = {"000000": write_shard(tmp_path, "000000", rows_a), "000001": write_shard(tmp_path, "000001", rows_b)}
    dedup_all(shards, str(tmp_path / "work"), str(tmp_path / "out"), DedupConfig(buckets=8, near_dup=False))
    v = verdicts(tmp_path / "out")
    assert v["0000010000"]["dup_of_key"] == "0000000000" and v["0000010000"]["dup_reason"] == "sha256"
    # B1 was removed for its (url, alt); its pointer is followed through B0 to A0
    assert v["0000010001"]["dup_of_key"] == "0000000000" and v["0000010001"]["dup_reason"] == "url_alt"
    assert v["0000000000"]["dup_of"] is None


def test_near_duplicates_do_not_chain():
    """A~B and B~C but not A~C: B points to A, C stays (it is not within the threshold of a kept row)."""
    a = np.array([1.0, 0.0])
    angle = np.arccos(0.96)
    b = np.array([np.cos(angle), np.sin(angle)])
    c = np.array([np.cos(2 * angle), np.sin(2 * angle)])
    vectors = np.stack([a, b, c]).astype(np.float32)
    assert float(a @ c) < 0.95
    pointer = near_duplicate_pointers(vectors, np.array([0, 1, 2]), 0.95)
    assert pointer.tolist() == [-1, 0, -1]
    # the representative is chosen by order, not by position
    pointer = near_duplicate_pointers(vectors, np.array([2, 1, 0]), 0.95)
    assert pointer.tolist() == [-1, 2, -1]


def test_same_result_for_any_bucket_count_on_exact_dups(tmp_path):
    rng = np.random.default_rng(1)
    rows = [
        {"url": f"http://x/{i % 37}.jpg", "caption": f"c{i % 5}", "sha": f"s{i % 53}", "emb": None}
        for i in range(300)
    ]
    shards = {f"{s:06d}": write_shard(tmp_path / "in", f"{s:06d}", rows[s * 100:(s + 1) * 100]) for s in range(3)}
    results = []
    for buckets in (1, 7, 64):
        out = tmp_path / f"out{buckets}"
        dedup_all(shards, str(tmp_path / f"w{buckets}"), str(out), DedupConfig(buckets=buckets, near_dup=False))
        results.append({k: (r["dup_of_key"], r["dup_reason"]) for k, r in verdicts(out).items()})
    assert results[0] == results[1] == results[2]
    kept = [k for k, (d, _) in results[0].items() if d is None]
    # every distinct image keeps exactly one representative among rows that have an image
    assert len(kept) >= 53 and rng is not None


def _planted(tmp_path: Path, shards: int = 4, per_shard: int = 1500, seed: int = 3):
    """CLIP-like unit vectors (shared direction + topic + noise) with 2% planted copies: half exact
    (same image bytes and embedding), half near (cosine 0.972-0.995).

    Returns (inputs, exact pairs, near pairs), each pair as (original key, copy key)."""
    rng = np.random.default_rng(seed)
    n, dim = shards * per_shard, 64
    mu = unit(rng.normal(size=dim))
    topics = rng.normal(size=(200, dim))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    x = np.sqrt(0.4) * mu + np.sqrt(0.3) * topics[rng.integers(0, 200, n)] + np.sqrt(0.3) * rng.normal(size=(n, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    picked = rng.choice(n, n // 25, replace=False)
    copies, originals = picked[: len(picked) // 2], picked[len(picked) // 2 :]
    exact = np.arange(len(copies)) % 2 == 0
    sha = [f"img{i}" for i in range(n)]
    for c, o, e in zip(copies, originals, exact):
        if e:
            x[c], sha[c] = x[o], sha[o]
        else:
            cos = rng.uniform(0.972, 0.995)
            noise = rng.normal(size=dim)
            noise -= (noise @ x[o]) * x[o]
            x[c] = cos * x[o] + np.sqrt(1 - cos**2) * unit(noise)
    inputs = {}
    for s in range(shards):
        rows = [{"url": f"http://x/{i}.jpg", "caption": f"c{i}", "sha": sha[i], "emb": x[i]}
                for i in range(s * per_shard, (s + 1) * per_shard)]
        inputs[f"{s:06d}"] = write_shard(tmp_path / "in", f"{s:06d}", rows)
    key = lambda i: f"{i // per_shard:06d}{i % per_shard:04d}"  # noqa: E731
    pairs = [(key(o), key(c)) for o, c in zip(originals, copies)]
    return inputs, [p for p, e in zip(pairs, exact) if e], [p for p, e in zip(pairs, exact) if not e]


def test_planted_duplicates_recall_and_precision(tmp_path):
    """Recall per kind: exact copies are found by their sha256 (all of them, always), near copies only
    by the clustered embedding search, so near recall is what measures the search and is checked alone."""
    inputs, exact_pairs, near_pairs = _planted(tmp_path)
    config = DedupConfig(cluster_size=100, buckets=4, near_dup_threshold=0.95)
    dedup_all(inputs, str(tmp_path / "work"), str(tmp_path / "out"), config, max_runs=2)
    v = verdicts(tmp_path / "out")
    rep = {k: r["dup_of_key"] or k for k, r in v.items()}
    assert len(exact_pairs) == len(near_pairs) == 60
    exact_missed = [(a, b) for a, b in exact_pairs if rep[a] != rep[b]]
    near_recall = float(np.mean([rep[a] == rep[b] for a, b in near_pairs]))
    planted = {frozenset(p) for p in exact_pairs + near_pairs}
    removed = [(k, r["dup_of_key"]) for k, r in v.items() if r["dup_of_key"]]
    precision = float(np.mean([frozenset(p) in planted for p in removed]))
    assert not exact_missed, f"exact copies (same sha256) not deduplicated: {exact_missed}"
    assert near_recall >= 0.95, f"near-duplicate recall {near_recall:.3f} over {len(near_pairs)} planted pairs"
    assert precision >= 0.99, precision


def test_object_count_is_runs_plus_buckets_not_shards_times_buckets(tmp_path):
    inputs, _, _ = _planted(tmp_path, shards=6, per_shard=200)
    config = DedupConfig(cluster_size=50, buckets=16)
    dedup_all(inputs, str(tmp_path / "work"), str(tmp_path / "out"), config, max_runs=2)
    work = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
    # per run: rows parquet, vectors, their nearest clusters, ranks, other probes; per bucket: one decision file;
    # one centroids file; the snapshot's near pairs (curate dedups each subset with them)
    assert len(work) == 5 * 2 + 16 + 1 + 1
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 6  # one verdict file per shard


def test_representative_is_the_downloaded_copy(tmp_path):
    """A URL+alt pair whose first copy failed to download keeps the other copy (issue 12.5)."""
    from laion_tasks import layout
    from laion_tasks.config import ClipConfig, CurateConfig, SubsetConfig
    from laion_tasks.stages.curate import curate_snapshot

    root, snap = str(tmp_path / "root"), "CC-TEST"
    rows = {
        "000000": [("http://a/0.jpg", "a cat", "failed_to_download", None, None)],
        "000001": [("http://a/0.jpg", "a cat", "success", "img0", 0.40),  # same (url, alt), downloaded
                   ("http://b/1.jpg", "a dog", "success", "img1", 0.10),  # below the CLIP threshold ...
                   ("http://b/2.jpg", "a dog", "success", "img1", 0.40)],  # ... so its sha256 twin represents
    }
    inputs = {}
    for shard, items in rows.items():
        keys = [f"{shard}{i:04d}" for i in range(len(items))]
        images = layout.images_parquet_uri(root, snap, shard)
        clip = layout.clip_parquet_uri(root, snap, shard)
        Path(images).parent.mkdir(parents=True, exist_ok=True)
        Path(clip).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "key": keys, "uid": [hashlib.sha256(f"{u}\x00{c}".encode()).hexdigest()[:32] for u, c, *_ in items],
            "url": [r[0] for r in items], "caption": [r[1] for r in items], "status": [r[2] for r in items],
            "sha256": [hashlib.sha256(r[3].encode()).hexdigest() if r[3] else None for r in items],
        }), images)
        pq.write_table(pa.table({
            "key": keys, "similarity": pa.array([r[4] for r in items], pa.float32()),
            "clip_status": ["scored" if r[4] is not None else "no_image" for r in items],
            "language_group": ["en"] * len(items), "has_embedding": [False] * len(items),
        }), clip)
        inputs[shard] = (images, clip, None)
    dedup_all(inputs, str(tmp_path / "work"), layout.dedup_dir(root, snap), DedupConfig(near_dup=False), ClipConfig())
    v = verdicts(Path(layout.dedup_dir(root, snap)))
    assert v["0000010000"]["dup_of"] is None and v["0000000000"]["dup_of_key"] == "0000010000"
    assert v["0000010002"]["dup_of"] is None and v["0000010001"]["dup_of_key"] == "0000010002"
    config = CurateConfig(subsets={"all": SubsetConfig(where="true")})
    stats = curate_snapshot(root, snap, config, clip=ClipConfig())["all"]
    assert stats.counts["kept"] == 2  # both groups keep a row
    assert stats.counts["drop:duplicate"] == 0


def test_pruned_search_finds_exactly_the_pairs_above_the_threshold():
    from laion_tasks.stages.dedup import similar_pairs

    rng = np.random.default_rng(4)
    x = rng.normal(size=(600, 64)) + 3 * unit(rng.normal(size=64))
    x[300:] = x[:300] + 0.25 * rng.normal(size=(300, 64))  # a spread of similarities around the threshold
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    qa, qb = similar_pairs(x, x[::2], 0.95, block=128)
    sims = x @ x[::2].T
    assert set(zip(qa.tolist(), qb.tolist())) == set(zip(*np.nonzero(sims >= 0.95 - 1e-6)))
    assert 300 < len(qa) < 600 * 300  # more than the 300 self-pairs, far fewer than all pairs
