"""Worker processes of the download stage: start-up, per-process limits, one event loop each.

One shard's rows are dealt round-robin to P worker processes (default: one per core), fresh
interpreters started by :mod:`laion_tasks.subproc`, so they work whatever the host's ``__main__``
is (an Airflow task process under any executor, the CLI, a pod, pytest). Each runs its own
event loop (fetching, with the same guards and opt-out checks) AND decodes, resizes and
encodes, inline on that loop by default (one worker per core is CPU-bound, so a thread would
only add hand-offs) or in ``download.decode_threads`` threads, then sends back only the small
result (status + encoded output bytes) over a pipe. The original
bytes never cross a process boundary, and no single event loop has to carry the whole shard.
The global and per-host limits are divided by the number of workers. robots.txt and
tdmrep.json are fetched once per origin for all the workers, through a
:class:`~laion_tasks.net.origin_cache.SharedOriginStore` (the task's, handed in by the stage,
or one made for this call). A blocklist that cannot be pickled makes the run stay in this
process (one loop, same checks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import mmap
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from typing import Any

from laion_tasks import subproc
from laion_tasks.config import DownloadConfig
from laion_tasks.net.origin_cache import SharedOriginStore
from laion_tasks.progress import Progress
from laion_tasks.stage import StageError
from laion_tasks.stages.download.fetch import SUCCESS, Blocklist, Fetcher, SampleResult
from laion_tasks.stages.image_ops import ImageOptions, process_image

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What one download run returns: a result per row, plus totals for the shard's stats."""

    results: list[SampleResult]
    retries: int = 0
    bytes_downloaded: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _make_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop is optional: the stdlib loop is only slower
        return asyncio.new_event_loop()


def worker_count(config: DownloadConfig) -> int:
    if config.processes > 0:
        return config.processes
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def per_process_config(config: DownloadConfig, processes: int) -> DownloadConfig:
    """Split the global and per-host limits across ``processes`` workers (rounded up).

    Rows are dealt round-robin, so every worker may talk to every host: dividing the
    limits keeps the shard-wide totals at (about) the configured values.
    """
    if processes <= 1:
        return config
    return config.model_copy(
        update={
            "max_concurrency": max(1, math.ceil(config.max_concurrency / processes)),
            "max_per_host": max(1, math.ceil(config.max_per_host / processes)),
        }
    )


async def _fetch_rows(
    rows: list[tuple[int, str | None]],
    emit: Any,
    config: DownloadConfig,
    blocklist: Blocklist | None,
    on_body: Any = None,
    origin_store: SharedOriginStore | None = None,
) -> tuple[int, int]:
    """Fetch and process ``rows`` on the running loop; ``emit(i, result)`` once per row.

    ``on_body(i)`` is called when row i's bytes are in (before the hash-list check and the
    decode). Returns (retries, bytes downloaded).
    """
    options = ImageOptions.from_config(config)
    loop = asyncio.get_running_loop()
    fetcher = Fetcher(config, blocklist, origin_store)
    executor = (
        concurrent.futures.ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="laion-decode")
        if config.decode_threads > 0
        else None
    )

    inspect = pdq_inspector(blocklist)

    async def process(data: bytes, final_url: str, sha256: str) -> SampleResult:
        if executor is None:  # decode_threads=0: inline, blocking this loop while it runs
            image = process_image(data, options, inspect, sha256)
        else:
            image = await loop.run_in_executor(executor, process_image, data, options, inspect, sha256)
        if image.status == BLOCKED:  # nothing of a listed image leaves the worker: no size, no hash
            return SampleResult(BLOCKED, image.error_message)
        return SampleResult(image.status, image.error_message, final_url, image)

    async def one(i: int, url: str | None) -> None:
        if not url or not isinstance(url, str):
            emit(i, SampleResult("invalid_url", "empty URL"))
            return
        try:
            result = await fetcher.fetch(url, process, None if on_body is None else lambda: on_body(i))
        except Exception as exc:  # noqa: BLE001 - a bug must cost one row, not the shard
            log.exception("download of row %d failed unexpectedly", i)
            result = SampleResult("internal_error", f"{type(exc).__name__}: {str(exc)[:300]}")
        emit(i, result)

    try:
        await asyncio.gather(*(one(i, url) for i, url in rows))
    finally:
        await fetcher.close()
        if executor is not None:
            executor.shutdown(wait=True)
    return fetcher.retries, fetcher.bytes_downloaded


BLOCKED = "blocked_hashlist"


def pdq_inspector(blocklist: Blocklist | None) -> Any:
    """The decoded-image check for PDQ hash lists, or None without one.

    Runs in the decode threads on the decoded original, before the resize: a match is
    refused before any thumbnail exists, so its bytes, thumbnail and embedding are never
    written (the parent writes only successes).
    """
    pdq_blocked = getattr(blocklist, "pdq_blocked", None)
    if pdq_blocked is None or getattr(blocklist, "pdq", None) is None:
        return None

    def inspect(image: Any) -> tuple[str, str] | None:
        if pdq_blocked(image):
            return BLOCKED, "image is within the PDQ distance of a safety hash list entry; not stored"
        return None

    return inspect


def _worker_main(
    rows: list[tuple[int, str | None]],
    config: DownloadConfig,
    blocklist_pickle: bytes | None,
    conn: Any,
    in_hand: Any,
    origin_store: SharedOriginStore | None = None,
) -> None:
    """Worker process: fetch + process ``rows``; sends lists of messages: ("row", i, result) when row
    i is finished, and ("done", ...) at the end.

    ``in_hand`` (shared memory, one byte per row of this worker, in ``rows`` order) is set when a row's
    bytes are in and cleared once its result has been sent: if this process dies on those bytes, the
    parent still knows which rows it held. A shared byte instead of a message per body saves a pipe
    write, a parent wake-up and a pickle per image."""
    blocklist = pickle.loads(blocklist_pickle) if blocklist_pickle is not None else None
    position = {i: j for j, (i, _url) in enumerate(rows)}

    pending: list[tuple[Any, ...]] = []  # messages go in batches: fewer sends, recvs and wake-ups
    flush_scheduled = False

    def flush() -> None:
        nonlocal flush_scheduled
        flush_scheduled = False
        if pending:
            conn.send(list(pending))
            for message in pending:
                if message[0] == "row":
                    in_hand[position[message[1]]] = 0
            pending.clear()

    def emit(i: int, result: SampleResult) -> None:
        nonlocal flush_scheduled
        pending.append(("row", i, result))
        if not flush_scheduled:
            flush_scheduled = True
            asyncio.get_running_loop().call_soon(flush)

    def on_body(i: int) -> None:
        in_hand[position[i]] = 1

    with asyncio.Runner(loop_factory=_make_loop) as runner:
        retries, downloaded = runner.run(_fetch_rows(rows, emit, config, blocklist, on_body, origin_store))
    matches = dict(getattr(blocklist, "matches", None) or {})
    pending.append(("done", retries, downloaded, matches))
    flush()
    conn.close()


def _worker_process(fd: int, flags_fd: int) -> None:
    """Entry point of a worker interpreter (see :mod:`laion_tasks.subproc`): the rows, config,
    blocklist and the task's origin store come as one pickle on stdin; messages go back on pipe
    ``fd``; file ``flags_fd`` is the shared rows-in-hand map (one byte per row)."""
    from multiprocessing.connection import Connection

    rows, config, blocklist_pickle, origin_store = subproc.receive()
    subproc.exit_with_parent()
    in_hand = mmap.mmap(flags_fd, max(1, len(rows)))
    _worker_main(rows, config, blocklist_pickle, Connection(fd, readable=False), in_hand, origin_store)


WORKER_CRASH_ATTEMPTS = 3
"""A worker that dies (e.g. a native crash on a hostile image) blames the rows whose bytes it
was working on (``decode_error``, as a crashed decode pool did before); its other unfinished
rows go to fresh workers, at most this many rounds, then get ``internal_error``."""


def download_rows(
    urls: list[str | None],
    on_success: Any,
    config: DownloadConfig,
    blocklist: Blocklist | None,
    progress: Progress | None = None,
    origin_store: SharedOriginStore | None = None,
) -> RunOutcome:
    """Download ``urls``; ``on_success(i, result)`` is called in this process for each success.

    Runs in ``worker_count(config)`` worker processes when the blocklist can be pickled
    (HashLists can); otherwise in this process, on one loop with a decode thread pool.
    ``origin_store``: the task's robots.txt / tdmrep.json answers, shared with every other
    shard of the task; without one, a store for this call alone (shared by its workers).
    """
    if origin_store is None:
        own_store = SharedOriginStore.create()
        try:
            return download_rows(urls, on_success, config, blocklist, progress, own_store)
        finally:
            own_store.close()
    results: list[SampleResult | None] = [None] * len(urls)
    outcome = RunOutcome(results=[])

    def receive(i: int, result: SampleResult) -> None:
        results[i] = result
        if progress is not None:
            progress.advance()
        if result.status == SUCCESS:
            on_success(i, result)
            assert result.image is not None
            result.image.data = None  # written: free the bytes now

    def blame(i: int) -> None:
        if results[i] is None:
            results[i] = SampleResult("decode_error", "worker process died while processing this image")

    rows = [(i, url) for i, url in enumerate(urls)]
    blocklist_pickle: bytes | None = None
    in_process = False
    if blocklist is not None:
        try:
            blocklist_pickle = pickle.dumps(blocklist, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - any object may be handed in
            log.warning("blocklist %r cannot be pickled (%s): downloading in this process", type(blocklist), exc)
            in_process = True
    if in_process:
        with asyncio.Runner(loop_factory=_make_loop) as runner:
            outcome.retries, outcome.bytes_downloaded = runner.run(
                _fetch_rows(rows, receive, config, blocklist, origin_store=origin_store)
            )
    elif rows:
        processes = max(1, min(worker_count(config), len(rows)))
        for attempt in range(1, WORKER_CRASH_ATTEMPTS + 1):
            crashed = _run_workers(rows, processes, config, blocklist, blocklist_pickle, receive, blame, outcome,
                                   origin_store)
            unfinished = [(i, url) for i, url in rows if results[i] is None]
            if len(unfinished) == len(rows) and crashed == processes:
                raise StageError(f"all {processes} download worker processes died before finishing one row")
            rows = unfinished
            if not rows:
                break
            log.warning("%d worker process(es) died; %d rows unfinished (attempt %d)", crashed, len(rows), attempt)
        for i, _url in rows:
            results[i] = SampleResult(
                "internal_error", f"download worker processes died {WORKER_CRASH_ATTEMPTS} times before this row finished"
            )
    outcome.results = [r if r is not None else SampleResult("internal_error", "no result recorded") for r in results]
    return outcome


def _run_workers(
    rows: list[tuple[int, str | None]],
    processes: int,
    config: DownloadConfig,
    blocklist: Blocklist | None,
    blocklist_pickle: bytes | None,
    receive: Any,
    blame: Any,
    outcome: RunOutcome,
    origin_store: SharedOriginStore,
) -> int:
    """Run one round of workers over ``rows``; returns how many died without finishing."""
    from multiprocessing.connection import Connection, wait

    worker_config = per_process_config(config, processes)
    conns: dict[Any, Any] = {}
    in_hand: dict[Any, tuple[list[int], mmap.mmap]] = {}  # per worker: its rows, and which it holds, unfinished
    procs = []
    maps: list[tuple[Any, mmap.mmap]] = []
    try:
        for w in range(processes):  # start them all first: they import in parallel
            share = rows[w::processes]
            flags_file = tempfile.TemporaryFile()  # unlinked; shared with the worker by descriptor
            flags_file.truncate(max(1, len(share)))
            flags = mmap.mmap(flags_file.fileno(), max(1, len(share)))  # zeroed
            maps.append((flags_file, flags))
            read_fd, write_fd = os.pipe()
            try:
                proc = subproc.start_python(__name__, "_worker_process", write_fd, flags_file.fileno(),
                                            pass_fds=(write_fd, flags_file.fileno()))
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)  # the child holds the write end: EOF here when it exits
            reader = Connection(read_fd, writable=False)
            conns[reader] = proc
            in_hand[reader] = ([i for i, _url in share], flags)
            procs.append(proc)
        for w, proc in enumerate(procs):
            subproc.send(proc, (rows[w::processes], worker_config, blocklist_pickle, origin_store))
        finished = 0
        while conns:
            for reader in wait(list(conns)):
                try:
                    messages = reader.recv()
                except EOFError:
                    del conns[reader]
                    reader.close()
                    indices, flags = in_hand.pop(reader)
                    for j, i in enumerate(indices):  # set only if it died mid-row
                        if flags[j]:
                            blame(i)
                    continue
                for message in messages:
                    if message[0] == "row":
                        receive(message[1], message[2])
                    else:  # ("done", retries, bytes, hash-list matches)
                        finished += 1
                        outcome.retries += message[1]
                        outcome.bytes_downloaded += message[2]
                        counter = getattr(blocklist, "matches", None)
                        if message[3] and hasattr(counter, "update"):
                            counter.update(message[3])
        return processes - finished
    finally:
        for proc in procs:
            if conns:  # left early (an error here): nobody will read what the workers send
                proc.kill()
            subproc.close(proc)
        for reader in conns:
            reader.close()
        for flags_file, flags in maps:
            flags.close()
            flags_file.close()
