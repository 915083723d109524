"""Progress of long shard work: a bar on a terminal, a steady log line everywhere else.

A download shard of 10,000 images or a CLIP shard on a CPU runs for minutes. On a terminal
(stderr is a TTY: the ``laion`` CLI) a rich progress bar shows rows done, rate and ETA.
Elsewhere (Airflow task logs, Kubernetes pod logs, pytest) a line such as
``download 00003: 4,200/10,000 rows (42.0%), 140.3 rows/s, ETA 41s`` is logged every
``orchestration.progress_interval_s`` seconds, plus one line when the work ends.

Usage, in the process that sees rows finish::

    with Progress("clip 00003", total=len(rows), unit="pairs") as progress:
        for batch in batches:
            ...
            progress.advance(len(batch))
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, Callable

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0
_interval_s = DEFAULT_INTERVAL_S


def configure(interval_s: float) -> None:
    """Seconds between progress log lines in this process (0: a line on every update)."""
    global _interval_s
    _interval_s = max(0.0, float(interval_s))


def shard_label(stage: str, uri: str) -> str:
    """``clip 00003`` from a stage and its shard's input URI."""
    return f"{stage} {uri.rstrip('/').rsplit('/', 1)[-1].split('.', 1)[0]}"


def _use_bar() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class _SharedBar:
    """One rich live display per process; each open :class:`Progress` is a task row on it.

    Rich allows only one live display at a time, and shard loops may nest (a batch of
    shards, each with its own rows), so the display is reference-counted.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.display: Any = None
        self.users = 0

    def add(self, label: str, total: int | None, unit: str) -> int:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with self.lock:
            if self.display is None:
                self.display = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"),
                    TextColumn("{task.fields[rate]}"),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                    TimeElapsedColumn(),
                    console=Console(stderr=True),
                )
                self.display.start()
            self.users += 1
            return int(self.display.add_task(label, total=total, unit=unit, rate=""))

    def update(self, task: int, completed: int, rate: str) -> None:
        with self.lock:
            if self.display is not None:
                self.display.update(task, completed=completed, rate=rate)

    def remove(self, task: int) -> None:
        with self.lock:
            if self.display is None:
                return
            self.display.refresh()
            self.users -= 1
            if self.users <= 0:
                self.display.stop()
                self.display = None
                self.users = 0


_bar = _SharedBar()


class Progress:
    """Rows done of ``total`` for one piece of work; a bar on a TTY, else a log line per interval."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "rows",
        bar: bool | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self._clock = clock
        self._log = logger or log
        self._interval = _interval_s if interval_s is None else max(0.0, interval_s)
        self._started = clock()
        self._next_line = self._started + self._interval
        self._task: int | None = _bar.add(label, total, unit) if (_use_bar() if bar is None else bar) else None
        self._closed = False

    def advance(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done += n
        now = self._clock()
        if self._task is not None:
            _bar.update(self._task, self.done, f"{self.rate(now):,.1f}/s")
        elif now >= self._next_line:
            self._log.info("%s", self.line(now))
            self._next_line = now + self._interval

    def rate(self, now: float | None = None) -> float:
        elapsed = (self._clock() if now is None else now) - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None, finished: bool = False) -> str:
        """``label: done/total unit (pct), rate unit/s, ETA`` as logged."""
        now = self._clock() if now is None else now
        rate = self.rate(now)
        if self.total:
            head = f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({100.0 * self.done / self.total:.1f}%)"
        else:
            head = f"{self.label}: {self.done:,} {self.unit}"
        text = f"{head}, {rate:,.1f} {self.unit}/s"
        if finished:
            return f"{text}, finished in {_seconds(now - self._started)}"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_seconds((self.total - self.done) / rate)}"
        return text

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            _bar.remove(self._task)
        elif failed:
            self._log.info("%s; stopped by an error", self.line())
        else:
            self._log.info("%s", self.line(finished=True))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)


def _seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"
