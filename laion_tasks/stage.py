"""The contract every stage follows.

A stage is a plain function over one shard: it reads its inputs by URI, writes its
outputs atomically and returns a :class:`ShardStats` with counts by outcome. Lineage
recording wraps the call (see :func:`laion_tasks.lineage.run_stage`), so the stage
itself stays pure and testable.

Outcome names: ``kept`` / ``success`` for rows that go on; ``drop:<reason>`` for rows
a filter removed; ``fail:<reason>`` for rows that could not be processed; ``bad:<reason>``
for unreadable input records. Every input row lands in exactly one outcome.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class ShardStats:
    counts: Counter[str] = field(default_factory=Counter)
    output_uri: str | None = None
    bytes_written: int = 0
    checksum: str | None = None
    """sha256 of the main output object."""
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def add(self, outcome: str, n: int = 1) -> None:
        if n:
            self.counts[outcome] += n

    def merge(self, other: "ShardStats") -> None:
        self.counts.update(other.counts)
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
            **({"extra": self.extra} if self.extra else {}),
        }


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
