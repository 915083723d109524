"""Progress of shard work: log lines at a steady interval off a terminal, a rich bar on one."""

from __future__ import annotations

import logging
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from laion_tasks import progress
from laion_tasks.progress import Progress, shard_label

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_follow_the_interval_not_the_updates(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="laion_tasks.progress")
    with Progress("download 00003", 10_000, bar=False, interval_s=30, clock=clock) as p:
        for _ in range(10):  # 10 s of work: no line yet
            clock.now += 1
            p.advance(100)
        assert caplog.messages == []
        clock.now += 20  # 30 s since the start
        p.advance(2_000)
        assert caplog.messages == ["download 00003: 3,000/10,000 rows (30.0%), 100.0 rows/s, ETA 70s"]
        clock.now += 29
        p.advance(1_000)
        assert len(caplog.messages) == 1  # next line is due 30 s after the last one
        clock.now += 1
        p.advance(0)  # nothing done: no update
        p.advance(1)
        assert caplog.messages[-1].startswith("download 00003: 4,001/10,000 rows (40.0%)")
    assert caplog.messages[-1] == "download 00003: 4,001/10,000 rows (40.0%), 66.7 rows/s, finished in 60s"


def test_interval_comes_from_configure_and_errors_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="laion_tasks.progress")
    clock = FakeClock()
    progress.configure(0)
    try:
        p = Progress("clip 00001", None, unit="pairs", bar=False, clock=clock)
        clock.now += 2
        p.advance(5)
        p.advance(5)
    finally:
        progress.configure(progress.DEFAULT_INTERVAL_S)
    assert caplog.messages == ["clip 00001: 5 pairs, 2.5 pairs/s", "clip 00001: 10 pairs, 5.0 pairs/s"]
    with pytest.raises(RuntimeError):
        with Progress("tag 00002", 4, bar=False, clock=clock) as p:
            p.advance(1)
            raise RuntimeError("boom")
    assert caplog.messages[-1].endswith("stopped by an error")


def test_bar_on_a_terminal_nests_and_releases_the_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_use_bar", lambda: True)
    outer = Progress("download batch", 2, unit="shards")
    inner = Progress("download 00001", 50)
    inner.advance(50)
    assert progress._bar.display is not None and progress._bar.users == 2
    inner.close()
    outer.advance(1)
    outer.close()
    assert progress._bar.display is None and progress._bar.users == 0


def test_shard_label() -> None:
    assert shard_label("clip", "s3://b/CC/download/00003.parquet") == "clip 00003"
    assert shard_label("tag", "/data/x/00012.parquet") == "tag 00012"


def test_a_terminal_gets_a_bar_with_count_rate_and_eta() -> None:
    """A real pseudo-terminal on stderr: what `laion clip` shows."""
    script = (
        "import time\n"
        "from laion_tasks.progress import Progress\n"
        "with Progress('clip 00007', 40, unit='pairs') as p:\n"
        "    for _ in range(40):\n"
        "        p.advance(1); time.sleep(0.01)\n"
    )
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert "clip 00007" in text and "40/40" in text and "pairs" in text and "ETA" in text and "/s" in text
    assert "finished in" not in text  # no log line on a terminal
