"""The contract every stage follows.

A stage is a plain function over one shard: it reads its inputs by URI, writes its
outputs atomically and returns a :class:`ShardStats` with counts by outcome. Lineage
recording wraps the call (see :func:`laion_tasks.lineage.run_stage`), so the stage
itself stays pure and testable.

Each stage module also declares the stage once, as a :class:`StageSpec` (name, upstream
stages, result-changing knobs, commit object, shard function); the generic runner
(:mod:`laion_tasks.runner`) plans, batches, skips or runs and records every stage from it.

Outcome names: ``kept`` / ``success`` for rows that go on; ``drop:<reason>`` for rows
a filter removed; ``fail:<reason>`` for rows that could not be processed; ``bad:<reason>``
for unreadable input records. Every input row lands in exactly one outcome.
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
