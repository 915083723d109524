"""Snapshot-scale dedup: CPU per row, peak memory, and recall/precision against a brute-force ground truth.

Synthetic CLIP-like fp16 512-d image embeddings (a shared direction plus one of many topic
directions plus noise, so random pairs sit near cosine 0.4 and same-topic pairs near 0.7, as
CLIP image embeddings do), written as download/clip shards with memory-mapped .npy files, one
chunk at a time (``np.lib.format.open_memmap``), so no size ever holds all its vectors in memory.
Planted duplicates, each of a distinct original:

* exact copies (``--exact`` of rows): same image bytes (sha256) and the same embedding, another URL;
* near copies (``--near`` of rows): another image whose embedding has a cosine drawn uniformly from
  ``--near-cosine`` (default 0.94-0.995: some fall below the 0.95 threshold, where a drop is a false
  positive, and many in the [0.95, 0.972) band near it);
* chains (``--chains`` of rows, three rows each): A~B and B~C at 0.951-0.972 but A~C below 0.95, where
  the no-chain rule forbids dropping C for A.

**Ground truth by brute force, from outside the method**: for ``--queries`` rows drawn at random, every
row of the whole size with cosine >= threshold, by exact inner-product search (FAISS ``IndexFlatIP``
range search over blocks of the memory-mapped shards). A true near pair is one of those whose rows are
not byte-identical copies (the sha256 step finds those; they are scored apart, never averaged in):

* ``recall_near``: true near pairs the near-dup search found (an edge in ``pairs.parquet``), overall and
  for the [threshold, 0.972) band and the [0.972, 1] band; ``recall_near_outcome``: true near pairs whose
  output does not keep both (the looser criterion: a missed pair may still lose a row to a third);
* ``precision``: of the rows dropped as near duplicates, those whose representative is at or above the
  threshold, by the exact cosine of the two stored vectors (a drop whose representative is below it is a
  false positive); ``no_chain_violations``: drops whose representative is below the threshold by more than
  the fp16 rounding of the stored vectors (``FP16_TOLERANCE``), plus drops whose representative is not kept.

The planted pairs are scored the same way (all of them, not a sample: a tighter but planted-only figure).

Each size runs ours (laion_tasks.stages.dedup, all four steps, at ``DedupConfig``'s defaults unless
``--probes``/``--cluster-size`` say otherwise; ``--alt-probes`` adds runs at other ``near_dup_probes``
on the same data) and, up to ``--peer-rows``, the peer: this project's previous bucketed dedup
(bench/peers/dedup_bucketed.py, 64 buckets, 2 probes), whose per-bucket search is quadratic. Each run
is a child process. Cost is **CPU time** (user + system of the child and of its own children, from
``getrusage(RUSAGE_CHILDREN)`` around it): the 2-core machine is shared and loaded by other work, so wall
seconds vary with the load and are recorded but not compared. Peak RSS is the kernel's high-water mark
(VmHWM, which counts touched pages of memory-mapped files) and the peak of anonymous memory (RssAnon,
sampled every 0.2 s), the part the memory budget bounds.

    .venv/bin/python bench/dedup_bench.py --rows 1000000 4000000 16000000

Data lives under --workdir (default /tmp) and is deleted after each size (``--keep`` keeps it,
``--reuse`` runs on data kept before, ``--generate-only`` only writes it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DIM = 512
TOPICS = 10_000
CHUNK = 65_536
BAND_EDGE = 0.972
"""Upper edge of the band just above the threshold that the planted-only ground truth never had."""
FP16_TOLERANCE = 1e-3
"""A drop this far below the threshold is a chain (A~C of a chain is >= 0.005 below), not the rounding of the fp16
vectors the near step stores (a few 1e-4)."""


# ---------------------------------------------------------------- data


def _sha(keys: np.ndarray) -> list[str]:
    """A stand-in image sha256 per original (copies reuse their original's)."""
    return [hashlib.sha256(k.encode()).hexdigest() for k in keys.tolist()]


def _base_vectors(rng: np.random.Generator, n: int, mu: np.ndarray, topics: np.ndarray) -> np.ndarray:
    topic = rng.integers(0, len(topics), n)
    noise = rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
    x = np.sqrt(0.4) * mu + np.sqrt(0.3) * topics[topic] + np.sqrt(0.3) * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _keys(g: np.ndarray, shard_size: int) -> np.ndarray:
    """Global row index -> key (6-digit shard, 5-digit row): shards are ``shard_size`` rows each."""
    return np.char.add(np.char.zfill((g // shard_size).astype(str), 6), np.char.zfill((g % shard_size).astype(str), 5))


class Vectors:
    """Random access to the rows of all shards' memory-mapped .npy files by global row index."""

    def __init__(self, shards: dict[str, list[str]], shard_size: int, mode: str = "r") -> None:
        self.shard_size = shard_size
        self.files = [shards[s][2] for s in sorted(shards)]
        self.mode = mode

    def _open(self, s: int) -> np.ndarray:
        return np.load(self.files[s], mmap_mode=self.mode)  # type: ignore[arg-type]

    def read(self, g: np.ndarray) -> np.ndarray:
        """Normalised fp32 vectors of global rows ``g`` (any order), read shard by shard."""
        out = np.empty((len(g), DIM), dtype=np.float32)
        shard = g // self.shard_size
        order = np.argsort(g, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(len(self.files) + 1))
        for s in np.flatnonzero(np.diff(bounds)):
            sel = order[bounds[s] : bounds[s + 1]]
            out[sel] = self._open(int(s))[g[sel] % self.shard_size].astype(np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def write(self, g: np.ndarray, vec: np.ndarray) -> None:
        shard = g // self.shard_size
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            emb = np.load(self.files[int(s)], mmap_mode="r+")
            emb[g[sel] % self.shard_size] = vec[sel].astype(np.float16)
            emb.flush()
            del emb

    def blocks(self, rows: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first global row, normalised fp32 block) over all rows in order, about ``rows`` at a time."""
        start, parts, first = 0, [], 0
        for s in range(len(self.files)):
            parts.append(np.asarray(self._open(s), dtype=np.float32))
            start += len(parts[-1])
            if start - first >= rows or s == len(self.files) - 1:
                block = np.concatenate(parts)
                yield first, block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
                parts, first = [], start


def _perturb(base: np.ndarray, cos: np.ndarray, rng: np.random.Generator, also: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors at exactly ``cos`` to the unit rows of ``base``, by noise orthogonal to ``base`` (and to the
    unit rows of ``also``, so that their cosine to ``also`` is ``cos`` times ``base``'s)."""
    refs = [base]
    if also is not None:  # Gram-Schmidt: the part of ``also`` orthogonal to ``base``
        perp = also - (also * base).sum(1, keepdims=True) * base
        refs.append(perp / np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-12))
    noise = rng.standard_normal(base.shape).astype(np.float32)
    for ref in refs:
        noise -= (noise * ref).sum(1, keepdims=True) * ref
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return base * cos[:, None] + noise * np.sqrt(1 - cos**2)[:, None]


def generate(root: Path, rows: int, shard_size: int, exact: float, near: float, chains: float,
             near_cos: tuple[float, float], chain_cos: tuple[float, float], seed: int) -> dict:
    """Write shards under root, streaming (one chunk of vectors in memory at a time); plant the duplicates;
    write ``planted.parquet`` (a, b, kind, cos). Returns the shard inputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    mu = rng.standard_normal(DIM).astype(np.float32)
    mu /= np.linalg.norm(mu)
    topics = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    n_exact, n_near, n_chain = int(rows * exact), int(rows * near), int(rows * chains / 3)
    picked = rng.choice(rows, 2 * n_exact + 2 * n_near + 3 * n_chain, replace=False)
    e_orig, e_copy = picked[:n_exact], picked[n_exact : 2 * n_exact]
    cut = 2 * n_exact
    n_orig, n_copy = picked[cut : cut + n_near], picked[cut + n_near : cut + 2 * n_near]
    cut += 2 * n_near
    c_a, c_b, c_c = picked[cut : cut + n_chain], picked[cut + n_chain : cut + 2 * n_chain], picked[cut + 2 * n_chain :]
    sha_of = np.arange(rows, dtype=np.int64)
    sha_of[e_copy] = e_orig  # exact copies carry their original's image bytes
    n_shards = (rows + shard_size - 1) // shard_size
    (root / "in").mkdir(parents=True, exist_ok=True)
    shards = {}
    for s in range(n_shards):
        lo, hi = s * shard_size, min(rows, (s + 1) * shard_size)
        shard = f"{s:06d}"
        emb = np.lib.format.open_memmap(root / "in" / f"{shard}.img.npy", mode="w+", dtype=np.float16, shape=(hi - lo, DIM))
        for a in range(0, hi - lo, CHUNK):
            b = min(hi - lo, a + CHUNK)
            emb[a:b] = _base_vectors(rng, b - a, mu, topics).astype(np.float16)
        emb.flush()
        del emb
        keys = _keys(np.arange(lo, hi), shard_size)
        sim = rng.uniform(0.2, 0.45, hi - lo).astype(np.float32)
        pq.write_table(pa.table({
            "key": keys, "uid": np.char.add("u", keys), "url": np.char.add("http://img.example/", keys),
            "caption": np.char.add("caption ", keys), "status": np.full(hi - lo, "success"),
            "sha256": _sha(_keys(sha_of[lo:hi], shard_size)),
        }), root / "in" / f"{shard}.parquet")
        pq.write_table(pa.table({
            "key": keys, "similarity": sim, "language_group": np.full(hi - lo, "en"), "has_embedding": np.ones(hi - lo, bool),
        }), root / "in" / f"{shard}.clip.parquet")
        shards[shard] = [str(root / "in" / f"{shard}.parquet"), str(root / "in" / f"{shard}.clip.parquet"),
                         str(root / "in" / f"{shard}.img.npy")]
    vectors = Vectors(shards, shard_size, mode="r")
    planted = []
    # plant a chunk at a time: originals are never copies, so reading them after earlier writes is safe
    for a in range(0, n_exact, CHUNK):
        sl = slice(a, a + CHUNK)
        vectors.write(e_copy[sl], vectors.read(e_orig[sl]))
        planted.append((e_orig[sl], e_copy[sl], "exact", np.ones(len(e_copy[sl]))))
    for a in range(0, n_near, CHUNK):
        sl = slice(a, a + CHUNK)
        cos = rng.uniform(*near_cos, len(n_copy[sl]))
        vectors.write(n_copy[sl], _perturb(vectors.read(n_orig[sl]), cos, rng))
        planted.append((n_orig[sl], n_copy[sl], "near", cos))
    for a in range(0, n_chain, CHUNK):
        sl = slice(a, a + CHUNK)
        va = vectors.read(c_a[sl])
        ab, bc = rng.uniform(*chain_cos, len(va)), rng.uniform(*chain_cos, len(va))
        vb = _perturb(va, ab, rng)
        vc = _perturb(vb, bc, rng, also=va)  # noise orthogonal to A and B: cos(A, C) = ab * bc exactly
        vectors.write(c_b[sl], vb)
        vectors.write(c_c[sl], vc)
        planted += [(c_a[sl], c_b[sl], "chain", ab), (c_b[sl], c_c[sl], "chain", bc),
                    (c_a[sl], c_c[sl], "chain_ends", ab * bc)]
    if planted:
        ga, gb = np.concatenate([p[0] for p in planted]), np.concatenate([p[1] for p in planted])
        pq.write_table(pa.table({
            "a": ga, "b": gb, "kind": np.concatenate([np.full(len(p[0]), p[2]) for p in planted]),
            "cos": np.concatenate([p[3] for p in planted]).astype(np.float64),
        }), root / "planted.parquet")
    return shards


# ---------------------------------------------------------------- ground truth


def brute_force(data: Path, shards: dict, shard_size: int, rows: int, queries: int, threshold: float, seed: int,
                margin: float = 0.01) -> dict:
    """Exact neighbours of ``queries`` random rows over all rows (cosine >= threshold - margin), streamed
    over the memory-mapped shards a block at a time; writes ``truth.parquet`` (q, b, cos) under ``data``."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0, c0 = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(seed + 1)
    q_rows = np.sort(rng.choice(rows, min(queries, rows), replace=False))
    vectors = Vectors(shards, shard_size)
    q = np.ascontiguousarray(vectors.read(q_rows))
    found_q, found_b, found_c = [], [], []
    for first, block in vectors.blocks():
        index = faiss.IndexFlatIP(DIM)
        index.add(np.ascontiguousarray(block))
        lims, dist, ids = index.range_search(q, float(threshold - margin))
        found_q.append(np.repeat(q_rows, np.diff(lims).astype(np.int64)))
        found_b.append(ids.astype(np.int64) + first)
        found_c.append(dist.astype(np.float64))
    pq.write_table(pa.table({"q": np.concatenate(found_q), "b": np.concatenate(found_b), "cos": np.concatenate(found_c)}),
                   data / "truth.parquet")
    return {"queries": int(len(q_rows)), "brute_force_cpu_s": time.process_time() - c0,
            "brute_force_wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- child runs


class PeakAnon:
    """Samples RssAnon of this process (what memory-mapped files do not inflate)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("RssAnon"))
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_kb("RssAnon"))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    shards = json.loads((Path(args.data) / "shards.json").read_text())
    work, out = Path(args.data) / f"work-{args.child}", Path(args.data) / f"out-{args.child}"
    anon = PeakAnon()
    steps: dict[str, float] = {}
    steps_cpu: dict[str, float] = {}
    t0 = time.perf_counter()

    steps_sys: dict[str, float] = {}
    sys_mark = [resource.getrusage(resource.RUSAGE_SELF).ru_stime]

    def step(name: str, t: float, c: float) -> None:
        steps[name], steps_cpu[name] = time.perf_counter() - t, time.process_time() - c
        now_sys = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        steps_sys[name], sys_mark[0] = now_sys - sys_mark[0], now_sys  # kernel time: page faults of the memory maps

    if args.child == "ours":
        from laion_tasks.config import ClipConfig, DedupConfig
        from laion_tasks.stages import dedup as d

        config = DedupConfig(memory_limit=args.memory_limit, cluster_size=args.cluster_size,
                             near_dup_probes=args.probes, buckets=args.buckets)
        inputs = [d.ShardInput(k, *v) for k, v in sorted(shards.items())]
        t, c = time.perf_counter(), time.process_time()
        d.dedup_centroids(inputs, d.centroids_uri(str(work)), config)
        step("centroids", t, c)
        t, c = time.perf_counter(), time.process_time()
        runs = d.make_runs([s.shard for s in inputs], max(1, len(inputs) * args.shard_size // 1_000_000))
        by_id = {s.shard: s for s in inputs}
        for run, ids in enumerate(runs):
            d.dedup_partition([by_id[s] for s in ids], run, str(work), config, ClipConfig(), d.centroids_uri(str(work)))
        step("partition", t, c)
        t, c = time.perf_counter(), time.process_time()
        for bucket in range(config.buckets):
            d.dedup_near(bucket, str(work), d.decision_uri(str(work), bucket), config)
        step("near", t, c)
        t, c = time.perf_counter(), time.process_time()
        d.dedup_resolve(str(work), str(out), config)
        step("resolve", t, c)
    else:
        sys.path.insert(0, str(REPO / "bench" / "peers"))
        import dedup_bucketed as peer

        peer.dedup_all({k: tuple(v) for k, v in shards.items()}, str(work), str(out), peer.DedupConfig())
    seconds = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "cpu_seconds_self": own.ru_utime + own.ru_stime, "code": _code_id(), "steps": steps,
                      "steps_cpu": steps_cpu, "steps_sys": steps_sys, "vmhwm_kb": _status_kb("VmHWM"), "anon_peak_kb": anon.stop()}))


def _code_id() -> str:
    """The commit and a digest of the dedup sources this run imported (the tree is shared and may move on)."""
    from laion_tasks.stages import dedup

    source = Path(dedup.__file__)
    files = sorted(source.parent.glob("*.py")) if source.name == "__init__.py" else [source]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{head.stdout.strip() or '?'}, dedup sources {digest}"


def _duckdb(data: Path):  # type: ignore[no-untyped-def]
    import duckdb

    con = duckdb.connect()
    con.execute("SET memory_limit='3GB'").fetchall()
    con.execute(f"SET temp_directory='{data / 'eval-spill'}'").fetchall()
    con.execute("SET preserve_insertion_order=false").fetchall()
    return con


def _wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson interval of a proportion k/n (the sampling error of a recall from a sample of pairs)."""
    if not n:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


def evaluate(data: Path, name: str, shard_size: int, threshold: float) -> dict:
    """Score one run's verdicts against the brute-force sample (truth.parquet) and the planted pairs.

    Rows are global indices (key = 6-digit shard + 5-digit row). A pair of byte-identical rows (same
    planted sha256) is an exact copy and scored apart; every other pair at cosine >= threshold is a near pair.
    """
    shards = json.loads((data / "shards.json").read_text())
    vectors = Vectors(shards, shard_size)
    con = _duckdb(data)
    g = f"(CAST(substr(key, 1, 6) AS BIGINT) * {shard_size} + CAST(substr(key, 7) AS BIGINT))"
    has_rank = name == "ours"
    con.execute(
        f"CREATE TABLE v AS SELECT {g} AS g, {'rank' if has_rank else 'NULL::BIGINT AS rank'}, "
        f"dup_of_key IS NULL AS kept, dup_reason, "
        f"CASE WHEN dup_of_key IS NOT NULL THEN {g.replace('key', 'dup_of_key')} END AS rep "
        f"FROM read_parquet('{data}/out-{name}/*.parquet')"
    ).fetchall()
    con.execute(f"CREATE TABLE p AS SELECT * FROM read_parquet('{data}/planted.parquet')").fetchall()
    # the exact group (same image bytes) of a row: its planted original for an exact copy, else itself
    con.execute("CREATE TABLE grp AS SELECT b AS g, a AS root FROM p WHERE kind = 'exact'").fetchall()
    con.execute(
        "CREATE TABLE gk AS SELECT coalesce(grp.root, v.g) AS root, bool_or(v.kept) AS kept "
        "FROM v LEFT JOIN grp USING (g) WHERE v.g IN (SELECT a FROM p UNION SELECT b FROM p "
        "UNION SELECT q FROM read_parquet(?) UNION SELECT b FROM read_parquet(?)) GROUP BY ALL",
        [str(data / "truth.parquet")] * 2,
    ).fetchall()
    work = data / f"work-{name}"
    if has_rank and (work / "pairs.parquet").exists():
        con.execute(f"CREATE TABLE e AS SELECT least(rank, dup) AS lo, greatest(rank, dup) AS hi "
                    f"FROM read_parquet('{work}/pairs.parquet') GROUP BY ALL").fetchall()
    else:
        con.execute("CREATE TABLE e (lo BIGINT, hi BIGINT)").fetchall()

    def score(pairs: str) -> dict:
        """Near pairs (a, b, cos), one per unordered pair, at cos >= threshold and not exact copies: found /
        resolved counts overall and per band."""
        con.execute(
            f"""
            CREATE OR REPLACE TABLE t AS
            WITH x AS (SELECT least(a, b) AS a, greatest(a, b) AS b, max(cos) AS cos FROM ({pairs})
                       WHERE a <> b AND cos >= {threshold} GROUP BY ALL),
                 y AS (SELECT x.*, coalesce(ga.root, x.a) AS ra, coalesce(gb.root, x.b) AS rb
                       FROM x LEFT JOIN grp AS ga ON ga.g = x.a LEFT JOIN grp AS gb ON gb.g = x.b)
            SELECT y.a, y.b, y.cos,
                   e.lo IS NOT NULL AS found,
                   NOT (ka.kept AND kb.kept) AS resolved
            FROM y JOIN v AS va ON va.g = y.a JOIN v AS vb ON vb.g = y.b
                 JOIN gk AS ka ON ka.root = y.ra JOIN gk AS kb ON kb.root = y.rb
                 LEFT JOIN e ON e.lo = least(va.rank, vb.rank) AND e.hi = greatest(va.rank, vb.rank)
            WHERE y.ra <> y.rb
            """
        ).fetchall()
        out: dict = {}
        for label, where in (("", "true"), ("_band_below_972", f"cos < {BAND_EDGE}"), ("_band_972_up", f"cos >= {BAND_EDGE}")):
            n, found, resolved = con.execute(f"SELECT count(*), count_if(found), count_if(resolved) FROM t WHERE {where}").fetchone()
            out[f"pairs{label}"] = int(n)
            if has_rank:
                out[f"recall{label}"] = _ratio(int(found), int(n))
            out[f"recall_outcome{label}"] = _ratio(int(resolved), int(n))
            if not label:
                out["recall_ci95"] = _wilson(int(found if has_rank else resolved), int(n))
        return out

    truth = score(f"SELECT q AS a, b, cos FROM read_parquet('{data}/truth.parquet')")
    # true pairs that were not planted (the synthetic data's own near duplicates, or planted rows meeting by chance)
    natural = con.execute("SELECT count(*) FROM t ANTI JOIN p ON least(p.a, p.b) = t.a AND greatest(p.a, p.b) = t.b"
                          ).fetchone()[0]
    # planted near pairs scored with the cosine their stored (fp16) vectors really have
    pl = con.execute("SELECT a, b, kind FROM p WHERE kind <> 'exact'").fetchnumpy()
    real = (vectors.read(pl["a"]) * vectors.read(pl["b"])).sum(1) if len(pl["a"]) else np.zeros(0)
    import pyarrow as pa

    con.register("pl", pa.table({"a": pl["a"], "b": pl["b"], "cos": real.astype(np.float64)}))
    planted = score("SELECT a, b, cos FROM pl")
    below = con.execute(f"SELECT count(*) FROM pl WHERE cos < {threshold}").fetchone()[0]
    exact_pairs, exact_resolved = con.execute(
        "SELECT count(*), count_if(NOT (va.kept AND vb.kept)) FROM p JOIN v AS va ON va.g = p.a JOIN v AS vb ON vb.g = p.b "
        "WHERE kind = 'exact'").fetchone()
    # precision and the no-chain rule, over every dropped row
    drops = con.execute("SELECT v.g, v.rep, v.dup_reason, r.kept AS rep_kept, coalesce(ga.root, v.g) AS ra, "
                        "coalesce(gb.root, v.rep) AS rb FROM v JOIN v AS r ON r.g = v.rep "
                        "LEFT JOIN grp AS ga ON ga.g = v.g LEFT JOIN grp AS gb ON gb.g = v.rep WHERE NOT v.kept").fetchnumpy()
    near = drops["dup_reason"] == "near_embedding"
    cos = np.empty(int(near.sum()))
    idx = np.flatnonzero(near)
    for a in range(0, len(idx), CHUNK):
        sel = idx[a : a + CHUNK]
        cos[a : a + len(sel)] = (vectors.read(drops["g"][sel]) * vectors.read(drops["rep"][sel])).sum(1)
    below_t = int((cos < threshold).sum())
    # the stored vectors are fp16 (error up to ~1e-4 in a cosine): a chain A~B~C is >= 0.005 below, a rounding 1e-4
    beyond_rounding = int((cos < threshold - FP16_TOLERANCE).sum())
    exact_wrong = int(((~near) & (drops["ra"] != drops["rb"])).sum())
    rep_not_kept = int((~drops["rep_kept"].astype(bool)).sum())
    chain_ends = con.execute(
        "SELECT count(*) FROM p JOIN v ON v.g = p.b AND v.rep = p.a WHERE p.kind = 'chain_ends'").fetchone()[0]
    removed = len(drops["g"])
    con.close()
    shutil.rmtree(data / "eval-spill", ignore_errors=True)
    result = {
        "removed": removed, "removed_near": int(near.sum()),
        "recall_near": truth.get("recall", truth["recall_outcome"]) if has_rank else None,
        "recall_near_band_950_972": truth.get("recall_band_below_972"),
        "recall_near_band_972_up": truth.get("recall_band_972_up"),
        "recall_near_outcome": truth["recall_outcome"],
        "recall_near_outcome_band_950_972": truth["recall_outcome_band_below_972"],
        "recall_near_ci95": truth["recall_ci95"],
        "true_near_pairs": truth["pairs"], "true_near_pairs_not_planted": int(natural), "true_near_pairs_band_950_972": truth["pairs_band_below_972"],
        "planted_recall_near": planted.get("recall"), "planted_recall_near_band_950_972": planted.get("recall_band_below_972"),
        "planted_recall_near_outcome": planted["recall_outcome"], "planted_near_pairs": planted["pairs"],
        "planted_near_pairs_band_950_972": planted["pairs_band_below_972"], "planted_pairs_below_threshold": int(below),
        "recall_exact": _ratio(int(exact_resolved), int(exact_pairs)),
        "precision": _ratio(int(near.sum()) - below_t, int(near.sum())),
        "false_positives_below_threshold": below_t,
        "false_positives_beyond_fp16_rounding": beyond_rounding,
        "lowest_representative_cosine": float(cos.min()) if len(cos) else None,
        "exact_drops_not_identical": exact_wrong,
        "representative_not_kept": rep_not_kept,
        "no_chain_violations": beyond_rounding + rep_not_kept,
        "chain_ends_dropped_for_each_other": int(chain_ends),
    }
    return result


def run_child(name: str, data: Path, args: argparse.Namespace, probes: int,
              meanwhile: Callable[[], None] | None = None) -> dict:
    """One measured run in a child process; its CPU time is the child's and its children's (RUSAGE_CHILDREN:
    the only child of this process while it runs). ``meanwhile`` runs in this process during the child's run
    (the brute-force ground truth of a new size: its CPU time is this process's own, not the child's)."""
    cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--memory-limit", args.memory_limit,
           "--cluster-size", str(args.cluster_size), "--probes", str(probes), "--buckets", str(args.buckets),
           "--shard-size", str(args.shard_size)]
    # one thread per run: the 2 cores are shared, and OpenMP spin-waits collapse under contention
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for old in (f"work-{name}", f"out-{name}"):
        shutil.rmtree(data / old, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    # output to files, not pipes: nobody reads a pipe while ``meanwhile`` runs, and a full one would stall the child
    out_path, err_path = data / f"child-{name}.out", data / f"child-{name}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err, \
            subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env) as proc:
        try:
            if meanwhile is not None:
                meanwhile()
            proc.wait(timeout=args.timeout)
        except BaseException:
            proc.kill()
            raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["cpu_sys_seconds"] = after.ru_stime - before.ru_stime
    result["load"] = f"{load:.1f} before, {os.getloadavg()[0]:.1f} after"
    result["concurrent_brute_force"] = meanwhile is not None
    return result


def evaluate_run(data: Path, name: str, args: argparse.Namespace) -> dict:
    """evaluate() plus the row count of the verdicts."""
    import pyarrow.parquet as pq

    t = time.perf_counter()
    result = evaluate(data, name, args.shard_size, args.threshold)
    result["rows_out"] = sum(pq.read_metadata(path).num_rows for path in (data / f"out-{name}").glob("*.parquet"))
    print(f"{name} evaluated in {time.perf_counter() - t:.0f} s", flush=True)
    return result


def main() -> None:
    from laion_tasks.config import DedupConfig

    default = DedupConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--peer-rows", type=int, default=250_000, help="run the quadratic peer only up to this size")
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--exact", type=float, default=0.01)
    ap.add_argument("--near", type=float, default=0.02)
    ap.add_argument("--near-cosine", type=float, nargs=2, default=[0.94, 0.995])
    ap.add_argument("--chains", type=float, default=0.003, help="fraction of rows in planted chains (3 rows each)")
    ap.add_argument("--chain-cosine", type=float, nargs=2, default=[0.951, 0.972])
    ap.add_argument("--queries", type=int, default=20_000, help="rows drawn at random for the brute-force ground truth")
    ap.add_argument("--threshold", type=float, default=default.near_dup_threshold)
    ap.add_argument("--memory-limit", default=default.memory_limit, help="dedup.memory_limit (checked against peak RSS)")
    ap.add_argument("--cluster-size", type=int, default=default.cluster_size)
    ap.add_argument("--probes", type=int, default=default.near_dup_probes)
    ap.add_argument("--alt-probes", type=int, nargs="*", default=[],
                    help="also run ours at these near_dup_probes on the same data (recorded as the run's 'alternates')")
    ap.add_argument("--buckets", type=int, default=default.buckets)
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--timeout", type=int, default=8 * 3600)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dedup.json"),
                    help="the JSON record (bench/README.md); give sizes run in parallel their own and --merge them")
    ap.add_argument("--label", default="latest", help="the run's label in the record (another label keeps the latest)")
    ap.add_argument("--truth-alongside", action="store_true",
                    help="run a new size's brute force while its first child runs (faster; the child shares the cores)")
    ap.add_argument("--reuse", action="store_true", help="reuse data already generated under --workdir")
    ap.add_argument("--keep", action="store_true", help="keep the generated data after the size")
    ap.add_argument("--generate-only", action="store_true", help="only generate the data (implies --keep)")
    ap.add_argument("--merge", nargs="+", help="only merge the sizes of these JSON records (sizes run in parallel) into --out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.merge:
        runs = [_recorded_run(Path(path)) for path in args.merge]
        merged = sorted((r for run in runs for r in run["results"]), key=lambda r: r["rows"])
        alternates = sorted((a for run in runs for a in run.get("alternates", [])), key=lambda a: (a["rows"], a["probes"]))
        # the merged sizes were measured where and when their invocations ran (each size keeps its own load)
        meta = {k: runs[0][k] for k in ("date", "machine")}
        meta["command"] = "; ".join(run["command"] for run in runs) + " (merged with --merge)"
        record(merged, alternates, args, load_before=None, meta=meta)
        return
    results, alternates = [], []
    load_before = os.getloadavg()[0]
    for rows in args.rows:
        data = Path(args.workdir) / f"laion-dedup-bench-{rows}"
        if not (args.reuse and (data / "shards.json").exists()):
            shutil.rmtree(data, ignore_errors=True)
        try:
            if not (data / "shards.json").exists():
                t, c = time.perf_counter(), time.process_time()
                shards = generate(data, rows, args.shard_size, args.exact, args.near, args.chains,
                                  tuple(args.near_cosine), tuple(args.chain_cosine), seed=rows)
                (data / "shards.json").write_text(json.dumps(shards))
                print(f"{rows} rows generated in {time.perf_counter() - t:.0f} s ({time.process_time() - c:.0f} CPU-s)",
                      flush=True)
            if args.generate_only:
                continue
            shards = json.loads((data / "shards.json").read_text())

            def ground_truth() -> None:
                truth = brute_force(data, shards, args.shard_size, rows, args.queries, args.threshold, seed=rows)
                (data / "truth.json").write_text(json.dumps(truth))
                print(f"brute force: {truth}", flush=True)

            # the brute force needs no verdicts: --truth-alongside runs it while the child runs (a big size then
            # takes the longer of the two, not their sum), at the price of sharing the cores with the measured run
            alongside = args.truth_alongside and not (data / "truth.json").exists()
            if not alongside and not (data / "truth.json").exists():
                ground_truth()
            ours = run_child("ours", data, args, args.probes, meanwhile=ground_truth if alongside else None)
            ours.update(evaluate_run(data, "ours", args))
            entry = {"rows": rows, "ours": {**ours, **json.loads((data / "truth.json").read_text())}}
            print(json.dumps(entry), flush=True)
            for probes in args.alt_probes:
                alt = {**run_child("ours", data, args, probes), **evaluate_run(data, "ours", args)}
                alternates.append({"rows": rows, "probes": probes, **alt})
                print(json.dumps(alternates[-1]), flush=True)
            if rows <= args.peer_rows:
                entry["peer"] = {**run_child("peer", data, args, args.probes), **evaluate_run(data, "peer", args)}
                print(json.dumps(entry["peer"]), flush=True)
            results.append(entry)
        finally:
            if not (args.keep or args.generate_only):
                shutil.rmtree(data, ignore_errors=True)
        record(results, alternates, args, load_before)  # after each size, so a long run leaves its finished sizes


def _recorded_run(path: Path) -> dict:
    """The latest run of a JSON record."""
    return json.loads(path.read_text())["runs"][-1]


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _interval(m: dict) -> str:
    """95% interval of the band's near recall (its brute-force pairs are few)."""
    n, r = m["true_near_pairs_band_950_972"], m["recall_near_band_950_972"]
    ci = _wilson(round(r * n), n) if r is not None else None
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"


def _met(value: float | None, ok: bool) -> str:
    return "not measured" if value is None else ("met" if ok else "**not met**")


def _notes(results: list[dict], alternates: list[dict], args: argparse.Namespace) -> list[str]:
    """The run's prose, computed from its figures (so it cannot claim more than they show)."""
    notes = []
    ours = [e for e in results if "ours" in e]
    if not ours:
        return notes
    recall = "; ".join(
        f"{e['rows']:,}: {_f(e['ours']['recall_near'])} (95% interval {_f(e['ours']['recall_near_ci95'][0], 3)}-"
        f"{_f(e['ours']['recall_near_ci95'][1], 3)}, {e['ours']['true_near_pairs']:,} pairs; "
        f"{_met(e['ours']['recall_near'], (e['ours']['recall_near'] or 0) >= 0.95)}), planted "
        f"{_f(e['ours']['planted_recall_near'])} ({e['ours']['planted_near_pairs']:,} pairs; "
        f"{_met(e['ours']['planted_recall_near'], (e['ours']['planted_recall_near'] or 0) >= 0.95)})"
        for e in ours if e["ours"].get("recall_near_ci95"))
    natural = sum(e["ours"].get("true_near_pairs_not_planted", 0) for e in ours)
    notes.append(
        f"**Near recall at `near_dup_probes={args.probes}`** (target >= 0.95), brute force and planted: {recall}. "
        f"The brute-force pairs are a random sample of the planted ones: the search over all rows found "
        f"{natural} true near pair(s) that were not planted, so the planted figure (every planted pair: "
        f"{min(e['ours']['planted_near_pairs'] for e in ours):,} to {max(e['ours']['planted_near_pairs'] for e in ours):,} "
        "here) is the same quantity measured on a larger set, and both are checked against the target.")
    fps = [(e["rows"], e["ours"]) for e in ours]
    notes.append(
        "**Precision and the no-chain rule**: " + "; ".join(
            f"{rows:,}: {m['false_positives_below_threshold']:,} of {m['removed_near']:,} near drops have a "
            f"representative below {args.threshold} (lowest cosine {_f(m['lowest_representative_cosine'], 5)}), "
            f"{m['no_chain_violations']:,} no-chain violation(s), {m['chain_ends_dropped_for_each_other']:,} chain "
            f"end(s) dropped for the other end" for rows, m in fps)
        + ". Drops a hair below the threshold come from the fp16 vectors the near step stores (a cosine error of a "
          "few 1e-4), not from chains: a chain's ends are >= 0.005 below.")
    if alternates:
        lines = []
        for rows in sorted({a["rows"] for a in alternates}):
            base = next((e["ours"] for e in ours if e["rows"] == rows), None)
            runs = ([(args.probes, base)] if base else []) + [(a["probes"], a) for a in alternates if a["rows"] == rows]
            lines.append(f"{rows:,}: " + ", ".join(
                f"probes {p} {m['cpu_seconds'] / rows * 1e6:.0f} µs/row, recall {_f(m['recall_near'], 3)} "
                f"(planted {_f(m['planted_recall_near'], 3)})" for p, m in sorted(runs, key=lambda r: r[0])))
        settings: dict[int, list[bool]] = {}
        for rows in (1_000_000, 4_000_000):
            base = next((e["ours"] for e in ours if e["rows"] == rows), None)
            runs = ([(args.probes, base)] if base else []) + [(a["probes"], a) for a in alternates if a["rows"] == rows]
            for probes, m in runs:
                settings.setdefault(probes, []).append(min(m["recall_near"] or 0, m["planted_recall_near"] or 0) >= 0.95)
        meets = sorted(p for p, ok in settings.items() if len(ok) == 2 and all(ok))
        notes.append("**Cost of `near_dup_probes`** (CPU per row and near recall on the same data): " + "; ".join(lines)
                     + ". Settings whose near recall, brute force and planted, is >= 0.95 at both 1M and 4M: "
                     + (", ".join(map(str, meets)) if meets else "none measured") + ".")
    one = next((e for e in ours if e["rows"] == 1_000_000), None)
    big = next((e for e in ours if e["rows"] == 16_000_000), None)
    if one and big:
        ratio = (big["ours"]["cpu_seconds"] / big["rows"]) / (one["ours"]["cpu_seconds"] / one["rows"])
        steps = ", ".join(f"{k} {big['ours']['steps_cpu'][k] / big['rows'] * 1e6:.1f} vs "
                          f"{one['ours']['steps_cpu'].get(k, 0) / one['rows'] * 1e6:.1f}"
                          for k in big["ours"].get("steps_cpu", {}))
        notes.append(f"**16M**: {big['ours']['cpu_seconds'] / big['rows'] * 1e6:.1f} CPU-µs per row against "
                     f"{one['ours']['cpu_seconds'] / one['rows'] * 1e6:.1f} at 1M: {ratio:.2f}x (target <= 1.3x: "
                     f"{_met(ratio, ratio <= 1.3)}). Per step, CPU-µs per row at 16M vs 1M: {steps}. "
                     + ("The 16M run shared the 2 cores with its own brute-force search for most of its run "
                        "(`concurrent_brute_force`); the 1M run did not. "
                        if big["ours"].get("concurrent_brute_force") and not one["ours"].get("concurrent_brute_force")
                        else "")
                     + "The 16M "
                     "embeddings were generated a chunk at a time into memory-mapped .npy files and never held in "
                     "memory.")
    elif one:
        notes.append("**16M**: not run in this record (cost per row at 16M <= 1.3x 1M: not measured).")
    notes.append("CPU time, not wall time, is the cost: the machine has 2 cores shared with other jobs (load average "
                 "per run in `load`), which stretch wall seconds several-fold; CPU time moves with the load too, "
                 "though far less, so compare sizes run back to back. `cpu_sys_seconds` and `steps_sys` are the "
                 "kernel's share (page faults of the memory-mapped vectors, which stop fitting the page cache at 16M).")
    return notes


def record(results: list[dict], alternates: list[dict], args: argparse.Namespace, load_before: float | None,
           meta: dict | None = None) -> None:
    """Write the run to the JSON record (bench/README.md); collect_results.py renders RESULTS.md from it."""
    sys.path.insert(0, str(REPO / "bench"))
    from collect_results import machine_info, now, save_run

    out = Path(args.out)
    settings = {"dim": DIM, "shard_size": args.shard_size, "exact": args.exact, "near": args.near,
                "near_cosine": list(args.near_cosine), "chains": args.chains, "chain_cosine": list(args.chain_cosine),
                "cluster_size": args.cluster_size, "probes": args.probes, "buckets": args.buckets,
                "memory_limit": args.memory_limit, "threshold": args.threshold, "ground_truth": "brute-force",
                "queries": args.queries, "peer_rows": args.peer_rows,
                "cpu_time": "user + system CPU of the run's process and its children (getrusage RUSAGE_CHILDREN)",
                "peer": "the previous bucketed dedup (bench/peers/dedup_bucketed.py, 64 buckets, 2 probes)"}
    setup = (
        f"Synthetic CLIP-like fp16 {DIM}-d embeddings, {args.shard_size:,} rows per shard, written a chunk at a time "
        f"(never all in memory). Planted: {args.exact:.0%} exact copies (same sha256 and embedding), {args.near:.0%} "
        f"near copies at cosine {args.near_cosine[0]}-{args.near_cosine[1]} (some below the {args.threshold} threshold), "
        f"{args.chains:.1%} of rows in chains A~B~C ({args.chain_cosine[0]}-{args.chain_cosine[1]} per link, A~C below "
        f"the threshold). Ours at the config defaults: `cluster_size={args.cluster_size}`, `near_dup_probes={args.probes}`, "
        f"`buckets={args.buckets}`, `memory_limit={args.memory_limit}`, threshold {args.threshold}. Peer: the previous "
        "bucketed dedup (64 buckets, 2 probes). Each run is one child process with one thread (OMP_NUM_THREADS=1). "
        "**CPU time** is user + system of that process and its children (`getrusage(RUSAGE_CHILDREN)`): the 2-core "
        "machine is shared and loaded by other work, which stretches wall seconds (recorded too) several-fold and CPU "
        "time less but measurably (shared caches and memory bandwidth; each run records its `load`), so sizes are "
        "compared from runs made back to back.\n\n"
        f"**Ground truth by brute force**: {args.queries:,} rows drawn at random per size; for each, every row of the "
        f"size at cosine >= {args.threshold}, by exact inner-product search (FAISS `IndexFlatIP` range search over "
        "blocks of the memory-mapped shards, fp32). Pairs of byte-identical rows (exact copies, which the sha256 step "
        "finds) are scored apart; every other pair is a true near pair. *Near recall* is the share of true near pairs "
        "the near-dup search found (an edge of the snapshot's `pairs.parquet`), never averaged with exact copies; the "
        f"[{args.threshold}, {BAND_EDGE}) band is reported on its own. *Outcome recall* is the looser share of true "
        "near pairs of which the output does not keep both rows. *Precision* is over the rows dropped as near "
        "duplicates: a drop whose representative's stored vector is below the threshold (exact fp32 cosine) is a false "
        "positive. *No-chain violations*: drops whose representative is below the threshold by more than the fp16 "
        f"rounding of the stored vectors ({FP16_TOLERANCE}; a chain's ends are >= 0.005 below), plus drops whose "
        "representative is not itself kept.")
    table_rows, checks = [], []
    for e in results:
        m = e["ours"]
        ci = m.get("recall_near_ci95")
        table_rows.append([
            f"{e['rows']:,}", f"{m.get('queries', 0):,}", f"{m['true_near_pairs']:,}", _f(m["recall_near"]),
            f"{_f(ci[0], 3)}-{_f(ci[1], 3)}" if ci else "-",
            f"{_f(m['recall_near_band_950_972'])} ({m['true_near_pairs_band_950_972']:,})",
            _f(m["recall_near_band_972_up"]), _f(m["recall_near_outcome"]),
            f"{_f(m['planted_recall_near'])} ({m['planted_near_pairs']:,})", _f(m["planted_recall_near_band_950_972"]),
            _f(m["precision"], 5), f"{m['false_positives_below_threshold']:,}", f"{m['no_chain_violations']:,}"])
        if "peer" in e:  # the previous design records no pairs: only its outcome is scored
            q = e["peer"]
            table_rows.append([
                f"{e['rows']:,} (previous bucketed dedup)", f"{m.get('queries', 0):,}", f"{q['true_near_pairs']:,}", "-",
                "-", "-", "-", _f(q["recall_near_outcome"]), f"- ({q['planted_near_pairs']:,})", "-",
                _f(q["precision"], 5), f"{q['false_positives_below_threshold']:,}", f"{q['no_chain_violations']:,}"])
        checks.append({"figure": f"near recall, [{args.threshold}, {BAND_EDGE}) band only, {e['rows']:,} rows "
                                 "(brute-force pairs)",
                       "value": m["recall_near_band_950_972"], "target": {"op": ">=", "value": 0.95, "text": ">= 0.95"},
                       "ours": _f(m["recall_near_band_950_972"]),
                       "comment": f"{m['true_near_pairs_band_950_972']:,} pairs, 95% interval {_interval(m)}; "
                                  f"planted pairs in the band: {_f(m['planted_recall_near_band_950_972'])}"})
        checks.append({"figure": f"near recall, every planted near pair, {e['rows']:,} rows",
                       "value": m["planted_recall_near"], "target": {"op": ">=", "value": 0.95, "text": ">= 0.95"},
                       "ours": _f(m["planted_recall_near"]),
                       "comment": f"{m['planted_near_pairs']:,} pairs (the brute-force sample's pairs are a subset)"})
    if results:
        violations = sum(e["ours"]["no_chain_violations"] for e in results)
        checks.append({"figure": "verdicts that break the no-chain rule, " + " / ".join(f"{e['rows']:,}" for e in results)
                       + " rows", "value": violations, "target": {"op": "==", "value": 0, "text": "0"},
                       "ours": " / ".join(str(e["ours"]["no_chain_violations"]) for e in results),
                       "comment": f"over every dropped row: representative below the threshold by more than {FP16_TOLERANCE} "
                                  "(fp16 rounding), or not itself kept"})
    tables = [{
        "title": "Near recall and precision against the brute-force ground truth (ours at the default settings)",
        "columns": ["rows", "queries", "true near pairs", "near recall", "95% interval",
                    f"[{args.threshold}, {BAND_EDGE}) recall (pairs)", f">= {BAND_EDGE}", "outcome recall",
                    "planted pairs recall (pairs)", f"planted [{args.threshold}, {BAND_EDGE})", "precision",
                    "false positives", "no-chain violations"],
        "rows": table_rows,
        "note": ("Near recall, the band and the interval come from the brute-force sample; the planted columns score "
                 "every planted near pair (cosine of the stored vectors >= threshold), a larger but planted-only set."),
    }]
    if alternates:
        base = {e["rows"]: e["ours"] for e in results}
        alt_rows = []
        for rows in sorted({a["rows"] for a in alternates} | set(base)):
            runs = [(args.probes, base[rows])] if rows in base else []
            runs += [(a["probes"], a) for a in alternates if a["rows"] == rows]
            for probes, m in sorted(runs, key=lambda r: r[0]):
                alt_rows.append([f"{rows:,}", str(probes) + (" (default)" if probes == args.probes else ""),
                                 f"{m['cpu_seconds'] / rows * 1e6:.1f}", _f(m["recall_near"]),
                                 _f(m["recall_near_band_950_972"]), _f(m["planted_recall_near"]), _f(m["precision"], 5),
                                 ", ".join(f"{k} {v:.0f}" for k, v in m.get("steps_cpu", {}).items())])
        tables.append({"title": "Cost of `near_dup_probes`: the same data at each setting",
                       "columns": ["rows", "near_dup_probes", "CPU µs/row", "near recall", f"[{args.threshold}, "
                                   f"{BAND_EDGE}) recall", "planted recall", "precision", "CPU s per step"],
                       "rows": alt_rows,
                       "note": "CPU time of the run's process (user + system)."})
    notes = _notes(results, alternates, args)
    run = {"label": args.label, "date": now(), "command": " ".join([".venv/bin/python bench/dedup_bench.py", *sys.argv[1:]]),
           "machine": machine_info(load_before), "setup": setup, "settings": settings, "results": results,
           "alternates": alternates, "checks": checks, "tables": tables, "notes": notes, **(meta or {})}
    save_run(out.stem, run, title="Snapshot-scale dedup (`bench/dedup_bench.py`)", results_dir=out.parent)
    print(f"recorded in {out}")


if __name__ == "__main__":
    main()
