"""The contract every stage follows.

A stage is a plain function over one shard: it reads its inputs by URI, writes its
outputs atomically and returns a :class:`ShardStats` with counts by outcome. Lineage
recording wraps the call (see :func:`laion_tasks.runner.run_stage`), so the stage
itself stays pure and testable.

Each stage module also declares the stage once, as a :class:`StageSpec` (name, upstream
stages, result-changing knobs, commit object, shard function); the generic runner
(:mod:`laion_tasks.runner`) plans, batches, skips or runs and records every stage from it.

Outcome names: ``kept`` / ``success`` for rows that go on; ``drop:<reason>`` for rows
a filter removed; ``fail:<reason>`` for rows that could not be processed; ``bad:<reason>``
for unreadable input records; ``skip:<reason>`` for rows a stage passes over without a
verdict (a CLIP row with no image to score); ``opted_out:<use>`` for rows whose publisher
refuses that use (download: AI-use preferences). Every input row lands in exactly one outcome.
Observations that are not about one input row (a tar member with no Parquet row, a
malformed hash) are ``diagnostics``: recorded in lineage, never added to the outcomes,
so outcome totals always equal the row count.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    import pyarrow as pa

    from laion_tasks.config import Settings
    from laion_tasks.lineage import Lineage

T = TypeVar("T")

# The stages, in pipeline order, and where each one's declaration lives (imported only when that
# stage is used: a DAG file imports the declarations, never a model library).
STAGE_MODULES: dict[str, str] = {
    "extract": "laion_tasks.stages.extract",
    "download": "laion_tasks.stages.download",
    "clip": "laion_tasks.stages.clip",
    "tag": "laion_tasks.stages.tag",
    "dedup_centroids": "laion_tasks.stages.dedup",
    "dedup_partition": "laion_tasks.stages.dedup",
    "dedup_bucket": "laion_tasks.stages.dedup",
    "dedup": "laion_tasks.stages.dedup",
    "curate": "laion_tasks.stages.curate",
    "index": "laion_tasks.stages.index",
    "train": "laion_tasks.stages.train",
    "eval": "laion_tasks.stages.evaluate",
}

VIEW_STAGES = ("curate", "index", "train", "eval")
"""Stages whose shards are alternative views of the same rows (one per subset): counted per shard."""


@dataclass
class ShardStats:
    counts: Counter[str] = field(default_factory=Counter)
    output_uri: str | None = None
    bytes_written: int = 0
    checksum: str | None = None
    """sha256 of the main output object."""
    extra: dict[str, Any] = field(default_factory=dict)
    diagnostics: Counter[str] = field(default_factory=Counter)
    """Counts that come on top of the outcomes (never summed into a funnel)."""
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def add(self, outcome: str, n: int = 1) -> None:
        if n:
            self.counts[outcome] += n

    def note(self, diagnostic: str, n: int = 1) -> None:
        """Count a diagnostic: something seen that is not one input row's outcome."""
        if n:
            self.diagnostics[diagnostic] += n

    def merge(self, other: "ShardStats") -> None:
        self.counts.update(other.counts)
        self.diagnostics.update(other.diagnostics)
        self.bytes_written += other.bytes_written

    def done(self) -> "ShardStats":
        self.finished = time.time()
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def duration_s(self) -> float:
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "output_uri": self.output_uri,
            "bytes_written": self.bytes_written,
            "checksum": self.checksum,
            "duration_s": round(self.duration_s, 3),
            **({"diagnostics": dict(self.diagnostics)} if self.diagnostics else {}),
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class Context:
    """What a stage needs to run on one snapshot: settings, ids, lineage, per-batch resources."""

    settings: "Settings"
    snapshot: str
    lineage: "Lineage | None" = None
    options: dict[str, Any] = field(default_factory=dict)
    """Per-run switches that are not config (e.g. ``retry_failed_downloads``)."""
    _resources: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return self.settings.storage.root

    def uri(self, role: str, default: str) -> str:
        """The file the command line named for ``role`` (``laion extract WAT OUT``: ``inputs["wat"]``,
        ``outputs["candidates"]``), else ``default``, the layout's path: one shard on explicit files
        runs the stage's own code through the runner."""
        return (self.options.get("inputs") or {}).get(role) or (self.options.get("outputs") or {}).get(role) or default

    def resource(self, name: str, make: Callable[[], T]) -> T:
        """Build something once per batch (hash lists, a model) and share it across shards."""
        if name not in self._resources:
            self._resources[name] = make()
        return self._resources[name]

    def forget(self, name: str) -> None:
        """Drop a cached resource (a plan that was just rewritten)."""
        self._resources.pop(name, None)

    def close(self) -> None:
        """Close the resources that hold something open (a DuckDB connection)."""
        for value in self._resources.values():
            if hasattr(value, "close"):
                value.close()
        self._resources.clear()


@dataclass(frozen=True)
class StageSpec:
    """A stage's whole story: what it reads, which knobs change its result, what commits it."""

    name: str
    """Lineage stage, ``laion run`` verb, DAG task id."""
    reads: tuple[str, ...]
    """Upstream stages whose outputs it reads. Same plan: the same shard id; other plan: all their shards."""
    result_fields: tuple[str, ...]
    """Dotted config paths (globs allowed; ``{shard}`` is the shard id) whose values change its output."""
    output: Callable[[Context, str], str]
    """The object (or prefix) that commits one shard's output: written last, checked before a skip."""
    run_shard: Callable[[Context, str], ShardStats]
    shards: Callable[[Context], list[str]]
    """The shard ids of the current plan (read from the plan's manifest; never re-plans)."""
    plan: Callable[[Context], list[str]] | None = None
    """Writes the plan (e.g. lists WAT files, regroups candidates) and returns its shard ids."""
    plan_name: str = ""
    """Stages with the same plan_name share shard ids (download, clip, tag, dedup_partition)."""
    input_uri: Callable[[Context, str], str] | None = None
    """What lineage shows as a run's input (default: the snapshot root)."""
    external_inputs: Callable[[Context, str], str] | None = None
    """Identity of inputs that are not stage outputs (a WAT URI, a download shard's checksum)."""
    section: str | None = None
    """Config section with its execution knobs, shipped whole to pods."""
    must_run: Callable[[Context, str], bool] | None = None
    """True for a shard that must run even when current (e.g. it has downloads to retry)."""
    after_batch: Callable[[Context, dict[str, Any]], dict[str, Any]] | None = None
    """Adds to a batch's report (e.g. a subset's manifest, a checkpoint URI)."""
    after: tuple[str, ...] = ()
    """Stages that must finish first although their outputs are not in the skip key (the download plan
    reads extract's candidates; the centroids sample the scored shards)."""
    mapped: bool = True
    """One DAG task per batch of the plan; False: one task for every shard (a snapshot-wide step)."""
    pod_section: str | None = None
    """Config section whose ``execution: kubernetes`` runs the stage as a GPU pod in the DAG."""
    publishes: Callable[["Settings"], list[str]] | None = None
    """Names of the Assets its DAG task announces (curate: one per subset), for the downstream DAGs."""
    downstream: bool = False
    """Runs in an Asset-triggered DAG after curation (index, train, eval), not in the snapshot DAG."""
    input_files: tuple[str, ...] = ()
    """Dotted config paths (globs allowed) that name input files, such as hash lists: each file's content
    (sha256, or the S3 ETag), not its path, enters the inputs half of the skip key."""

    def config_digest(self, settings: "Settings", shard: str) -> str:
        """Digest of this shard's result knobs: the config half of its skip key."""
        import hashlib
        import json

        blob = json.dumps(self.knobs(settings, shard), sort_keys=True, separators=(",", ":"), default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def knobs(self, settings: "Settings", shard: str) -> dict[str, Any]:
        """The values of the result fields for one shard (``a.b.{shard}``: entry ``shard`` of mapping ``a.b``)."""
        plain = [f for f in self.result_fields if "{shard}" not in f]
        out = settings.knobs(plain) if plain else {}
        for field_path in self.result_fields:
            if "{shard}" in field_path:
                parent = field_path.split(".{shard}", 1)[0]
                out[f"{parent}[{shard}]"] = (settings.knobs([parent])[parent] or {}).get(shard)
        return out

    def input_file_identities(self, ctx: Context) -> list[str]:
        """``file:<field>:<content identity>`` of each input file this stage reads (``-`` where unset)."""
        if not self.input_files:
            return []
        out = []
        for field_path, uri in ctx.settings.knobs(self.input_files).items():
            if uri is not None and not isinstance(uri, str):
                raise StageError(f"{self.name}: input file field {field_path} must name one file, got {uri!r}")
            out.append(f"file:{field_path}:{file_identity(ctx, uri) if uri else '-'}")
        return out


EXECUTION_ONLY: dict[str, str] = {
    "storage.*": "where the data lives and how it is reached, not what it is",
    "lineage.*": "where runs are recorded",
    "orchestration.progress_interval_s": "how often progress is logged",
    "download.shard_size": "cuts the plan, not a shard's output: each shard's content checksum is in its key",
    "download.processes": "worker processes: each row is fetched and decoded the same way whichever worker has it",
    "download.decode_threads": "decode threads per worker: the same decode, inline or in a thread",
    "download.max_concurrency": "requests in flight: speed and politeness, not the answer (timeouts and retries are keyed)",
    "download.max_per_host": "requests in flight per host: as max_concurrency",
    "download.backoff_*": "how long to wait before a retry (how many retries is keyed)",
    "download.opt_out_cache_ttl_s": "how long one origin's robots.txt / tdmrep.json answer is reused (at most 24 h, RFC 9309)",
    "clip.batch_size": "pairs per forward pass: float rounding at most, below the fp16 the embeddings are stored in",
    "clip.num_workers": "decode workers: rows are written in shard order",
    "clip.channels_last": "memory layout of the image tower: the same arithmetic, float rounding at most",
    "clip.compile": "torch.compile of the same graph: float rounding at most",
    "clip.execution": "in this process or in a pod: the same code on the same inputs. The device and precision are "
    "keyed as configured: with `auto` a CPU and a GPU run share a key, so name them to key the hardware",
    "tag.image_batch_size": "images decoded and scored together",
    "curate.duckdb_*": "DuckDB's memory, spill directory and threads: it spills to disk rather than change a result",
    "index.duckdb_memory_limit": "DuckDB spills beyond it",
    "index.add_batch_size": "vectors added per call: the same vectors in the same order",
    "eval.batch_size": "images per forward pass: float rounding at most",
    "eval.decode_threads": "decode threads: images are scored in dataset order",
    "train.shard_access": "copy the shards first or stream them: the same bytes",
    "pods.*": "where a GPU stage's pods run and with what resources (the pod runs the same code on the same inputs)",
}
"""Config fields that change how fast or where a stage runs, never what it writes, with the reason.
Never result fields (``tests/test_runner.py``); ``tests/test_result_fields.py`` checks that every
field a stage reads is a result field, an input file, a result field upstream, or here."""

UNKEYED_READS: dict[str, dict[str, str]] = {
    "download": {
        "hashlists.*": "the tag stage re-checks every row against the current lists (their content is in tag's "
        "key: URL, original sha256, stored bytes, PDQ), blocks it and strips its bytes, so a list that grows "
        "re-runs tag and downloads nothing again",
        "hashlists.pdq_max_distance": "as the hash lists: tag re-checks the PDQ hash of every stored image",
    },
    "dedup_partition": {
        "dedup.memory_limit": "DuckDB's budget here: it spills to disk rather than change a result",
        "orchestration.max_mapped_tasks": "groups the shards into dedup runs; a run's file is named by its "
        "members (the stage's output), so a shard whose run changed has no output and is partitioned again",
    },
    "dedup_bucket": {
        "orchestration.max_mapped_tasks": "finds the current runs' files, which dedup_partition re-wrote (and so "
        "re-ran) when the runs changed",
    },
    "dedup": {
        "dedup.memory_limit": "DuckDB's budget here: it spills to disk rather than change a result",
        "orchestration.max_mapped_tasks": "finds the current runs' files, as dedup_bucket",
    },
    "curate": {
        "curate.subsets.*": "one scan writes every configured subset; each subset's files are keyed by its own "
        "predicate (curate.subsets.{shard}), and a subset whose predicate changed re-runs itself",
    },
}
"""Fields one stage reads that are deliberately not in its key, and why its results stay right."""

_LOCAL_IDENTITIES: dict[tuple[str, int, int, int, int, int], str] = {}


def content_identity(uri: str) -> str:
    """What a file holds, cheaply: ``sha256:<hex>`` of a local or http(s) file, ``etag:<ETag>`` of an
    S3 object (one HEAD). Local digests are cached per process by path, inode, size, mtime and ctime,
    so a file edited in place (same path) gets a new identity and an unchanged one costs a ``stat``."""
    import hashlib

    from laion_tasks import storage

    if storage.is_s3(uri):
        loc = storage.parse_s3(uri)
        try:
            head = storage.s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as exc:  # noqa: BLE001 - botocore raises many types
            raise StageError(f"{uri}: cannot read its ETag: {type(exc).__name__}: {exc}") from exc
        return "etag:" + str(head["ETag"]).strip('"')
    if storage.is_http(uri):
        digest = hashlib.sha256()
        with storage.open_read(uri) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return "sha256:" + digest.hexdigest()
    path = storage.local_path(uri)
    try:
        st = path.stat()
    except OSError as exc:
        raise StageError(f"{uri}: cannot read input file: {exc.strerror or exc}") from exc
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _LOCAL_IDENTITIES:
        _LOCAL_IDENTITIES[key] = "sha256:" + storage.file_sha256(path)
    return _LOCAL_IDENTITIES[key]


def file_identity(ctx: Context, uri: str) -> str:
    """:func:`content_identity`, once per context (a batch): the skip key and the loaded content
    (e.g. :func:`laion_tasks.hashlists.hashlists_for`) see one version of the file."""
    return ctx.resource(f"file_identity:{uri}", lambda: content_identity(uri))


class StageError(RuntimeError):
    """A shard could not be processed at all. The message names the input and the reason."""


def read_parquet(uri: str, what: str, columns: list[str] | None = None) -> "pa.Table":
    """A stage's Parquet input (local or s3://); a failure names what it is, the URI and the reason."""
    import pyarrow.parquet as pq

    from laion_tasks import storage

    try:
        with storage.local_copy(uri) as path:
            return pq.read_table(path, columns=columns)
    except Exception as exc:  # noqa: BLE001 - storage and pyarrow errors alike
        raise StageError(f"{what} {uri}: cannot read parquet: {type(exc).__name__}: {exc}") from exc
