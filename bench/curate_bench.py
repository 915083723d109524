"""Curation + dataset card throughput on a generated snapshot, with a small DuckDB memory limit.

    .venv/bin/python bench/curate_bench.py [--rows 2000000] [--memory-limit 300MB]

No peer: LAION's subsets were cut with ad-hoc Spark/pandas scripts, not a tool we can run
side by side. What this shows is that curation stays out of core (peak RSS against the
DuckDB memory limit) and how many metadata rows per second one subset costs.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import layout
from laion_tasks.card import write_dataset_card
from laion_tasks.config import CurateConfig
from laion_tasks.stages.curate import curate_snapshot

SUBSETS = ["laion2B-en", "research-safe", "laion-high-resolution"]


def generate(root: str, snapshot: str, rows: int, per_shard: int = 50_000) -> None:
    rng = np.random.default_rng(0)
    for s in range(max(1, rows // per_shard)):
        shard = layout.shard_name(s)
        k = np.arange(per_shard)
        keys = pa.array([f"{s:05d}{i:05d}" for i in k])
        uids = pa.array([f"u{s}-{i}" for i in k])
        ok = rng.random(per_shard) < 0.8
        sim = rng.uniform(0.1, 0.45, per_shard).astype("float32")
        lang = rng.choice(np.array(["en", "de", "fr", None], dtype=object), per_shard)
        group = np.where(lang == "en", "en", np.where(lang == None, "nolang", "multi"))  # noqa: E711
        images = pa.table({
            "key": keys, "uid": uids,
            "url": pa.array([f"http://h{i % 1000}.example/{s}/{i}.jpg" for i in k]),
            "caption": pa.array([f"a caption about thing {i} in shard {s}" for i in k]),
            "status": np.where(ok, "success", "http_404"),
            "original_width": rng.choice([300, 640, 1024, 2000], per_shard),
            "original_height": rng.choice([200, 480, 1024, 1500], per_shard),
            "original_bytes": rng.integers(1000, 500_000, per_shard),
            "sha256": pa.array([f"{i:064x}" for i in k]),
        })  # fmt: skip
        clip = pa.table({
            "key": keys, "uid": uids, "similarity": pa.array(sim, mask=~ok),
            "clip_status": np.where(~ok, "no_image", np.where(sim >= 0.28, "kept", "filtered_clip_similarity")),
            "language": lang, "language_group": group,
        })  # fmt: skip
        tags = pa.table({
            "key": keys, "uid": uids, "language": lang, "language_group": group,
            "punsafe": rng.random(per_shard).astype("float32"), "pwatermark": rng.random(per_shard).astype("float32"),
            "hashlist_blocked": rng.random(per_shard) < 0.01,
        })  # fmt: skip
        for table, uri in (
            (images, layout.images_parquet_uri(root, snapshot, shard)),
            (clip, layout.clip_parquet_uri(root, snapshot, shard)),
            (tags, layout.tags_parquet_uri(root, snapshot, shard)),
        ):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, uri)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--memory-limit", default="300MB")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="curate-bench-")
    try:
        generate(root, "S", args.rows)
        config = CurateConfig(duckdb_memory_limit=args.memory_limit)
        start = time.perf_counter()
        results = curate_snapshot(root, "S", config, SUBSETS)
        curate_s = time.perf_counter() - start
        start = time.perf_counter()
        write_dataset_card(root, "S", None, results, config=config)
        card_s = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kept = {n: r.extra["rows"] for n, r in results.items()}
        print(f"rows={args.rows:,} memory_limit={args.memory_limit} subsets={kept}")
        print(f"curate {len(SUBSETS)} subsets: {curate_s:.1f}s = {args.rows * len(SUBSETS) / curate_s:,.0f} rows/s per subset")
        print(f"card (all {len(config.subsets)} configured subsets, no thumbnails tars): {card_s:.1f}s")
        print(f"peak RSS {rss:.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
