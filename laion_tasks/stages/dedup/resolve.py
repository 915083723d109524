"""Dedup step 4: one verdict per row from the exact groups and the near pairs, by the dedup rules."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import storage
from laion_tasks.config import DedupConfig
from laion_tasks.stage import ShardStats, StageError
from laion_tasks.stages.dedup.common import (
    CHUNK_ROWS,
    OUTPUT_SCHEMA,
    REASONS,
    _duckdb,
    _sql_list,
    list_runs,
    pairs_uri,
)

log = logging.getLogger(__name__)


def resolve_verdicts(con, rows: str, edges: str, *, max_hops: int = 64, sql_rounds: int = 32) -> int:  # type: ignore[no-untyped-def]
    """Verdicts for the rows of one scope: creates table ``dd(rank, kind, dup)``, one row per dropped row.

    ``rows``: a relation with ``rank, ua1, ua2, sh1, sh2`` (the scope: every row for the snapshot-wide
    verdict, the rows one subset qualifies for in curate); ``edges``: a relation ``(rank, dup)`` of
    near-duplicate pairs (either order; pairs with a row outside the scope are ignored).

    The rules, stated in the README:

    1. Exact copies (same url and alt, or same image sha256) are one sample: each points to the
       smallest rank of its copies in the scope. Identity is transitive, so these pointers are followed.
    2. Near duplicates are *not* transitive: among the exact representatives, a row is dropped only
       in favour of a kept row it is itself similar to (greedy in rank order: the lexicographically
       first maximal independent set of the similarity graph). No chain A~B~C drops C for A.
    3. Because the scope is exactly the rows that qualify, every duplicate group with a qualifying
       member keeps one (its smallest qualifying rank is always kept).

    The greedy pass runs as rounds of joins (a row is decided once all its smaller-rank neighbours
    are); the few rows still open after ``sql_rounds`` (long chains) are finished in Python.
    Returns the number of rounds used.
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE sc AS SELECT rank, ua1, ua2, sh1, sh2 FROM ({rows})").fetchall()
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE ex AS
        WITH ua AS (SELECT ua1, ua2, min(rank) AS rep FROM sc WHERE ua1 IS NOT NULL GROUP BY ua1, ua2 HAVING count(*) > 1),
             sh AS (SELECT sh1, sh2, min(rank) AS rep FROM sc WHERE sh1 IS NOT NULL GROUP BY sh1, sh2 HAVING count(*) > 1),
             p AS (SELECT sc.rank, 0 AS kind, ua.rep AS dup FROM sc JOIN ua USING (ua1, ua2) WHERE sc.rank <> ua.rep
                   UNION ALL
                   SELECT sc.rank, 1 AS kind, sh.rep AS dup FROM sc JOIN sh USING (sh1, sh2) WHERE sc.rank <> sh.rep),
             m AS (SELECT rank, min(struct_pack(k := kind, d := dup)) AS m FROM p GROUP BY rank)
        SELECT rank, m.k AS kind, m.d AS dup FROM m
        """
    ).fetchall()
    for hop in range(max_hops + 1):
        # a copy whose representative is itself a copy (a url_alt pair that is also a sha256 pair) takes its pointer
        if not con.execute("SELECT count(*) FROM ex JOIN ex AS t ON ex.dup = t.rank").fetchall()[0][0]:
            break
        con.execute(
            "CREATE OR REPLACE TEMP TABLE ex AS SELECT ex.rank, ex.kind, coalesce(t.dup, ex.dup) AS dup "
            "FROM ex LEFT JOIN ex AS t ON ex.dup = t.rank"
        ).fetchall()
    else:
        raise StageError(f"dedup_resolve: exact-copy pointers did not converge in {max_hops} hops")
    # near pairs between exact representatives (a copy's pair is its representative's: the same sample)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE e AS
        WITH g AS (SELECT rank, dup FROM ({edges})),
             root AS (SELECT sc.rank, coalesce(ex.dup, sc.rank) AS root FROM sc LEFT JOIN ex USING (rank)
                      WHERE sc.rank IN (SELECT rank FROM g UNION SELECT dup FROM g))
        SELECT DISTINCT greatest(a.root, b.root) AS hi, least(a.root, b.root) AS lo
        FROM g JOIN root AS a ON a.rank = g.rank JOIN root AS b ON b.rank = g.dup
        WHERE a.root <> b.root
        """
    ).fetchall()
    # state: 0 open, 1 kept, 2 dropped
    con.execute("CREATE OR REPLACE TEMP TABLE st AS SELECT hi AS rank, 0 AS s FROM e UNION SELECT lo, 0 FROM e").fetchall()
    rounds = 0
    while rounds < sql_rounds and con.execute("SELECT count(*) FROM st WHERE s = 0").fetchall()[0][0]:
        rounds += 1
        con.execute(
            """
            CREATE OR REPLACE TEMP TABLE st AS
            SELECT st.rank,
                   CASE WHEN st.s <> 0 THEN st.s
                        WHEN coalesce(n.kept, 0) > 0 THEN 2
                        WHEN coalesce(n.open, 0) = 0 THEN 1
                        ELSE 0 END AS s
            FROM st LEFT JOIN (
              SELECT e.hi AS rank, count_if(m.s = 1) AS kept, count_if(m.s <> 2) AS open
              FROM e JOIN st AS m ON m.rank = e.lo GROUP BY e.hi) AS n USING (rank)
            """
        ).fetchall()
    open_rows = con.execute("SELECT count(*) FROM st WHERE s = 0").fetchall()[0][0]
    if open_rows:
        _finish_greedy(con)
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE nd AS
        SELECT e.hi AS rank, min(e.lo) AS dup
        FROM e JOIN st AS k ON k.rank = e.lo AND k.s = 1 JOIN st AS x ON x.rank = e.hi AND x.s = 2
        GROUP BY e.hi
        """
    ).fetchall()
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE dd AS
        SELECT rank, 2 AS kind, dup FROM nd
        UNION ALL
        SELECT ex.rank, CASE WHEN nd.rank IS NULL THEN ex.kind ELSE 2 END AS kind, coalesce(nd.dup, ex.dup) AS dup
        FROM ex LEFT JOIN nd ON nd.rank = ex.dup
        """
    ).fetchall()
    return hop + rounds


def _finish_greedy(con) -> None:  # type: ignore[no-untyped-def]
    """The open rows of the greedy pass (long chains), decided in rank order in Python."""
    open_ranks = [r[0] for r in con.execute("SELECT rank FROM st WHERE s = 0 ORDER BY rank").fetchall()]
    state = dict(con.execute(
        "SELECT m.rank, m.s FROM e JOIN st AS o ON o.rank = e.hi AND o.s = 0 JOIN st AS m ON m.rank = e.lo"
    ).fetchall())
    lower: dict[int, list[int]] = {}
    for hi, lo in con.execute("SELECT e.hi, e.lo FROM e JOIN st AS o ON o.rank = e.hi AND o.s = 0").fetchall():
        lower.setdefault(hi, []).append(lo)
    for rank in open_ranks:
        state[rank] = 2 if any(state.get(lo) == 1 for lo in lower.get(rank, ())) else 1
    decided = pa.table({"rank": pa.array(open_ranks, pa.int64()), "s": pa.array([state[r] for r in open_ranks], pa.int32())})
    con.register("_decided", decided)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE st AS SELECT st.rank, coalesce(x.s, st.s) AS s FROM st LEFT JOIN _decided AS x USING (rank)"
    ).fetchall()
    con.unregister("_decided")


def dedup_resolve(
    work_dir: str, out_dir: str, config: DedupConfig, runs: list[str] | None = None,
    decisions: list[str] | None = None, max_hops: int = 64,
) -> ShardStats:
    """Exact groups plus near-dup decisions -> one verdict per row, in ``<out_dir>/<shard>.parquet``.

    ``runs`` / ``decisions``: what to read (default: everything under ``work_dir``).
    """
    stats = ShardStats(output_uri=out_dir)
    runs = [f"{p}.rows.parquet" for p in (list_runs(work_dir) if runs is None else runs)]
    if not runs:
        raise StageError(f"dedup_resolve: no runs under {storage.join(work_dir, 'runs')}")
    if decisions is None:
        decisions = storage.list_uris(storage.join(work_dir, "decisions"), ".parquet")
    with tempfile.TemporaryDirectory(prefix="laion-dedup-") as tmp, contextlib.ExitStack() as stack:
        con = _duckdb(config.memory_limit, Path(tmp) / "spill")
        run_files = [str(stack.enter_context(storage.local_copy(u))) for u in runs]
        near_files = [str(stack.enter_context(storage.local_copy(u))) for u in decisions]
        con.execute(f"CREATE VIEW r AS SELECT * FROM read_parquet({_sql_list(run_files)})").fetchall()
        near = f"SELECT rank, dup FROM read_parquet({_sql_list(near_files)})" if near_files else \
            "SELECT NULL::BIGINT AS rank, NULL::BIGINT AS dup WHERE false"
        with storage.atomic_local_path(pairs_uri(work_dir), suffix=".parquet") as pairs_tmp:
            con.execute(f"COPY (SELECT DISTINCT rank, dup FROM ({near})) TO '{pairs_tmp}' (FORMAT parquet)").fetchall()
        hop = resolve_verdicts(con, "SELECT * FROM r", near, max_hops=max_hops)
        con.execute("CREATE OR REPLACE TABLE d AS SELECT * FROM dd").fetchall()
        stats.extra["rounds"] = hop
        for kind, n in con.execute("SELECT kind, count(*) FROM d GROUP BY kind").fetchall():
            stats.add(f"drop:dup_{REASONS[kind]}", int(n))
        total = con.execute("SELECT count(*) FROM r").fetchall()[0][0]
        stats.add("kept", int(total) - sum(stats.counts.values()))
        reasons = "CASE d.kind " + " ".join(f"WHEN {i} THEN '{r}'" for i, r in enumerate(REASONS)) + " END"
        reader = con.sql(
            f"""
            SELECT r.uid, r.key, r.shard, t.uid AS dup_of, t.key AS dup_of_key, t.shard AS dup_of_shard,
                   {reasons} AS dup_reason, r.rank, r.ua1, r.ua2, r.sh1, r.sh2
            FROM r LEFT JOIN d ON d.rank = r.rank LEFT JOIN r AS t ON t.rank = d.dup
            ORDER BY r.shard, r.pos
            """
        ).to_arrow_reader(CHUNK_ROWS)
        stats.bytes_written = _write_per_shard(reader, out_dir)
        con.close()
    return stats.done()


def _write_per_shard(reader: pa.RecordBatchReader, out_dir: str) -> int:
    """Split a (shard, pos)-ordered stream into ``<out_dir>/<shard>.parquet`` files, a batch at a time."""
    written = 0
    current: str | None = None
    ctx: contextlib.ExitStack | None = None
    writer: pq.ParquetWriter | None = None
    path: Path | None = None

    def close() -> None:
        nonlocal written, ctx, writer
        if writer is not None and ctx is not None and path is not None:
            writer.close()
            written += path.stat().st_size
            ctx.close()
        writer = ctx = None

    try:
        for batch in reader:
            batch = pa.Table.from_batches([batch]).cast(OUTPUT_SCHEMA)
            shards = batch.column("shard").to_numpy(zero_copy_only=False)
            cuts = np.concatenate([[0], np.flatnonzero(shards[1:] != shards[:-1]) + 1, [len(shards)]])
            for a, b in zip(cuts[:-1], cuts[1:]):
                shard = str(shards[a])
                if shard != current:
                    close()
                    current = shard
                    ctx = contextlib.ExitStack()
                    path = ctx.enter_context(storage.atomic_local_path(storage.join(out_dir, f"{shard}.parquet"),
                                                                       suffix=".parquet"))
                    writer = pq.ParquetWriter(path, OUTPUT_SCHEMA, compression="zstd")
                assert writer is not None
                writer.write_table(batch.slice(int(a), int(b - a)))
        close()
    except BaseException as exc:
        if ctx is not None:
            if writer is not None:
                writer.close()
            ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return written
