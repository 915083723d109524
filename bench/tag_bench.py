"""Tag-stage throughput (samples/s per core) and dedup throughput + peak memory.

    .venv/bin/python bench/tag_bench.py [--tag-samples 2000] [--dedup-rows 10000000] [--near-rows 200000]

* Tagging: one synthetic shard of 256 px JPEGs (drawn shapes) with fp16 64-d embeddings,
  tagged by ``tag_shard`` with the tiny CLIP model (``laion-tiny-clip``; zero-shot NSFW and
  watermark), language copied from the clip parquet, PDQ for every image and all three hash lists loaded
  (10,000 entries each). No real CLIP, NSFW, watermark or aesthetic weights exist here:
  with real weights the embedding heads cost about the same (tiny MLPs), the watermark
  detector (efficientnet_b3 at 256 px) adds a CNN forward per image and is not measured.
  Pinned to one core; samples per CPU-second.
* Dedup: ``--dedup-rows`` synthetic rows in 100k-row shards with 20% exact (url, alt)
  copies and 15% image-sha256 copies, exact criteria only (partition -> 64 buckets ->
  resolve), each step timed, in a fresh process whose peak RSS is reported. Near-dup on
  ``--near-rows`` rows with 512-d fp16 embeddings (10% injected near copies, cos ~0.99),
  k-means buckets, with the recall of the injected copies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "tag.json"


def pin_one_core() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---------------------------------------------------------------- tagging


def bench_tag(samples: int) -> dict:
    pin_one_core()
    import torch

    torch.set_num_threads(1)
    from laion_tasks.config import ClipConfig, HashListsConfig, TagConfig
    from laion_tasks.hashlists import HashLists
    from laion_tasks.stages.tag import tag_shard
    from tests.tag_fixtures import TINY_CLIP, make_image, make_shard

    work = Path(tempfile.mkdtemp(prefix="tagbench-"))
    try:
        images = {i: make_image(i, size=256) for i in range(min(samples, 200))}
        shard = make_shard(work, n=samples, failed=tuple(range(0, samples, 10)),
                           images={i: images[i % len(images)] for i in range(samples)})
        for name, width in (("url", 32), ("img", 64), ("pdq", 64)):
            (work / f"{name}.txt").write_text("".join(hashlib.sha256(f"{name}{i}".encode()).hexdigest()[:width] + "\n"
                                                      for i in range(10_000)))
        config = TagConfig()
        lists = HashLists.from_config(HashListsConfig(url=str(work / "url.txt"), image=str(work / "img.txt"),
                                                      pdq=str(work / "pdq.txt")))
        clip = ClipConfig.model_validate(TINY_CLIP)
        # warm: model load, lid model, faiss index build are per-process setup
        warm = make_shard(work / "warm", n=20)
        tag_shard(warm.images_parquet, warm.tar, warm.clip_parquet, warm.img_emb, warm.out, config, clip, lists)
        start_cpu, start = time.process_time(), time.perf_counter()
        stats = tag_shard(shard.images_parquet, shard.tar, shard.clip_parquet, shard.img_emb, shard.out, config, clip, lists)
        cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
        return {"samples": samples, "images": int(stats.counts["success"]), "cpu_s": cpu, "wall_s": wall,
                "counts": dict(stats.counts)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- dedup data


def make_dedup_shards(root: Path, rows: int, per_shard: int, dim: int = 0, near_frac: float = 0.0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n_shards = (rows + per_shard - 1) // per_shard
    ids = np.arange(rows)
    # 20% of rows copy (url, alt) of a random earlier row; 15% copy only its image sha256
    url_src = np.where(rng.random(rows) < 0.20, (rng.random(rows) * np.maximum(ids, 1)).astype(np.int64), ids)
    sha_src = np.where(rng.random(rows) < 0.15, (rng.random(rows) * np.maximum(ids, 1)).astype(np.int64), url_src)
    if dim:  # the near-dup run measures near-dup recall alone: no exact copies
        url_src = sha_src = ids
    base = None
    if dim:
        base = rng.normal(size=(rows, dim)).astype(np.float32)
        near = rng.random(rows) < near_frac
        src = (rng.random(rows) * np.maximum(ids, 1)).astype(np.int64)
        near &= ids > 0
        noise = rng.normal(size=(int(near.sum()), dim)).astype(np.float32)
        base[near] = base[src[near]] / np.linalg.norm(base[src[near]], axis=1, keepdims=True) * 10 + noise * (
            10 * 0.1 / np.sqrt(dim))
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        np.save(root / "near_truth.npy", np.flatnonzero(near))
    for s in range(n_shards):
        lo, hi = s * per_shard, min(rows, (s + 1) * per_shard)
        shard = f"{s:06d}"
        keys = [f"{shard}{i - lo:06d}" for i in range(lo, hi)]
        urls = [f"http://host{u % 997}.example/img/{u}.jpg" for u in url_src[lo:hi]]
        caps = [f"caption number {u}" for u in url_src[lo:hi]]
        shas = [hashlib.sha256(str(h).encode()).hexdigest() for h in sha_src[lo:hi]]
        uids = [hashlib.sha256(f"{u}\x00{c}".encode()).hexdigest()[:32] for u, c in zip(urls, caps)]
        pq.write_table(pa.table({"key": keys, "uid": uids, "url": urls, "caption": caps,
                                 "status": ["success"] * len(keys), "sha256": shas}), root / f"{shard}.parquet")
        if dim:
            pq.write_table(pa.table({"key": keys, "has_embedding": [True] * len(keys)}), root / f"{shard}.clip.parquet")
            np.save(root / f"{shard}.img.npy", base[lo:hi].astype(np.float16))


def bench_dedup(root: Path, near: bool, buckets: int, probes: int = 2) -> dict:
    pin_one_core()
    from laion_tasks.config import ClipConfig, DedupConfig
    from laion_tasks.stages import dedup

    config = DedupConfig(buckets=buckets, near_dup=near, memory_limit="4GB", near_dup_probes=probes)
    shards = sorted(p.stem for p in root.glob("[0-9]*.parquet") if ".clip" not in p.name)
    work, out = str(root / "work"), str(root / "out")
    inputs = {s: dedup.ShardInput(s, str(root / f"{s}.parquet"), str(root / f"{s}.clip.parquet") if near else None,
                                  str(root / f"{s}.img.npy") if near else None) for s in shards}
    times = {}
    t0 = time.perf_counter()
    centroids = None
    if near:
        centroids = dedup.centroids_uri(work)
        dedup.dedup_centroids(list(inputs.values()), centroids, config)
        times["centroids"] = time.perf_counter() - t0
    t = time.perf_counter()
    for run, ids in enumerate(dedup.make_runs(shards, 16)):
        dedup.dedup_partition([inputs[s] for s in ids], run, work, config, ClipConfig(), centroids)
    times["partition"] = time.perf_counter() - t
    t = time.perf_counter()
    decisions = []
    if near:
        for b in range(buckets):
            decisions.append(dedup.decision_uri(work, b))
            dedup.dedup_near(b, work, decisions[-1], config)
    times["buckets"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = dedup.dedup_resolve(work, out, config, decisions=decisions)
    times["resolve"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    result = {"times": times, "counts": dict(stats.counts),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if near:
        import numpy as np
        import pyarrow.parquet as pq

        truth = set(np.load(root / "near_truth.npy").tolist())
        per_shard = pq.read_metadata(root / f"{shards[0]}.parquet").num_rows
        found = set()
        for s_i, s in enumerate(shards):
            reasons = pq.read_table(Path(out) / f"{s}.parquet", columns=["dup_reason"]).column("dup_reason").to_pylist()
            found |= {s_i * per_shard + i for i, r in enumerate(reasons) if r == "near_embedding"}
        result["near_recall"] = len(truth & found) / max(1, len(truth))
        result["near_found"] = len(found)
        result["near_injected"] = len(truth)
    return result


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag-samples", type=int, default=2000)
    parser.add_argument("--dedup-rows", type=int, default=10_000_000)
    parser.add_argument("--near-rows", type=int, default=200_000)
    parser.add_argument("--buckets", type=int, default=64)
    parser.add_argument("--child", choices=["tag", "gen", "dedup", "gen-near", "near"])
    parser.add_argument("--dir")
    args = parser.parse_args()
    if args.child == "tag":
        print(json.dumps(bench_tag(args.tag_samples)))
        return
    if args.child == "gen":
        make_dedup_shards(Path(args.dir), args.dedup_rows, 100_000)
        print("{}")
        return
    if args.child == "gen-near":
        make_dedup_shards(Path(args.dir), args.near_rows, 50_000, dim=512, near_frac=0.10)
        print("{}")
        return
    if args.child in ("dedup", "near"):
        print(json.dumps(bench_dedup(Path(args.dir), args.child == "near", args.buckets)))
        return

    tag = child(["--child", "tag", "--tag-samples", str(args.tag_samples)])
    print("tag", tag, flush=True)
    with tempfile.TemporaryDirectory(prefix="dedupbench-") as d:
        child(["--child", "gen", "--dir", d, "--dedup-rows", str(args.dedup_rows)])
        exact = child(["--child", "dedup", "--dir", d, "--buckets", str(args.buckets)])
    print("exact", exact, flush=True)
    with tempfile.TemporaryDirectory(prefix="neardupbench-") as d:
        child(["--child", "gen-near", "--dir", d, "--near-rows", str(args.near_rows)])
        near = child(["--child", "near", "--dir", d, "--buckets", str(args.buckets)])
    print("near", near, flush=True)

    record(tag, exact, near, args)


def record(tag: dict, exact: dict, near: dict, args: argparse.Namespace) -> None:
    """Write the run to bench/results/tag.json (bench/README.md); collect_results.py renders RESULTS.md from it."""
    sys.path.insert(0, str(ROOT / "bench"))
    from collect_results import machine_info, now, save_run

    def dedup_run(result: dict, rows: int, probes: int | None) -> dict:
        return {"rows": rows, "buckets": args.buckets, "probes": probes, "times_s": result["times"],
                "rows_per_s": rows / result["times"]["total"], "peak_rss_mb": result["peak_rss_mb"],
                "counts": result["counts"], **{k: result[k] for k in ("near_recall", "near_found", "near_injected")
                                               if k in result}}

    setup = ("Each measurement in a fresh process pinned to one core. No peer in the same run (LAION's tagging "
             "scripts need the real weights and a GPU). With real weights the NSFW/aesthetic heads are small MLPs "
             "on stored embeddings; the watermark CNN (efficientnet_b3, 256 px) and NudeNet add a per-image forward "
             "pass that is not measured here. Dedup: exact run with 20% (url, alt) copies and 15% sha256 copies "
             "injected, all steps sequentially in one process; near-dup run on random Gaussian embeddings (no "
             "cluster structure) with 10% injected near copies (cos ~0.99).")
    save_run("tag", {
        "date": now(), "command": " ".join([".venv/bin/python bench/tag_bench.py", *sys.argv[1:]]),
        "machine": machine_info(), "setup": setup,
        "tag": {"samples": tag["samples"], "images": tag["images"], "cpu_s": tag["cpu_s"], "wall_s": tag["wall_s"],
                "samples_per_cpu_s": tag["samples"] / tag["cpu_s"], "images_per_cpu_s": tag["images"] / tag["cpu_s"],
                "what": "tiny CLIP `laion-tiny-clip` zero-shot for punsafe/pwatermark, PDQ of every image, "
                        "URL/image/PDQ hash lists of 10,000 entries each"},
        "dedup": {"exact": dedup_run(exact, args.dedup_rows, None), "near": dedup_run(near, args.near_rows, 2)},
    }, title="Tagging and dedup throughput (`bench/tag_bench.py`)")
    print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
