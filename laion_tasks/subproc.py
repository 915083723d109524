"""Python worker processes that start the same way in every host process.

The stages run inside Airflow task processes (LocalExecutor and CeleryExecutor), inside the
Kubernetes pod's ``laion`` CLI, from the CLI and from pytest, each with a different
``__main__``. multiprocessing's ``spawn`` and ``forkserver`` re-run the parent's ``__main__``
in every child; in an Airflow task process that is the ``airflow`` console script, which
initialises Airflow's settings without the metadata-DB connection a task process is denied,
and the child dies. ``fork`` copies a process that may hold other threads' locks.

So a worker here is a fresh interpreter started as ``python -c``: it takes the parent's
``sys.path`` (so it imports the same ``laion_tasks`` and whatever the parent's pickles name),
imports the one module it is told to, and calls one function. Nothing else is imported.
Its stdin stays open while the parent lives; :func:`exit_with_parent` ends it when the parent
goes (even by SIGKILL), so no orphan keeps downloading.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from typing import Any, BinaryIO


def start_python(module: str, function: str, *args: int | str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start ``python -c "from MODULE import FUNCTION; FUNCTION(*ARGS)"`` with this process's sys.path.

    The child's stdin is a pipe: the parent may :func:`send` more pickles on it, and must close
    it when the child should exit. stdout and stderr are inherited (they land in the task log).
    """
    code = (
        "import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
        f"from {module} import {function}; {function}(*{args!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, pass_fds=pass_fds)
    send(proc, list(sys.path))
    return proc


def send(proc: subprocess.Popen[bytes], obj: Any) -> bool:
    """Pickle ``obj`` onto the child's stdin; False if the child is already gone."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        proc.stdin.flush()
        return True
    except (BrokenPipeError, ValueError):  # died early (its exit code tells why) or stdin closed
        return False


def receive() -> Any:
    """In the child: the next pickle the parent sent."""
    return pickle.load(sys.stdin.buffer)


def exit_with_parent(stdin: BinaryIO | None = None) -> None:
    """In the child: exit as soon as the parent closes our stdin or dies."""

    def watch() -> None:
        stream = stdin or sys.stdin.buffer
        while stream.read(65536):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def close(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Close the child's stdin (it exits if still running), wait, and kill it if it lingers."""
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
