"""The benchmark's output folder: one writer at a time, atomic files, writability checked early.

* :func:`output_lock` holds an exclusive, advisory lock (``filelock``: ``flock`` on POSIX,
  ``msvcrt`` locking on Windows) on ``OUT/.ocnopt-bench.lock`` for as long as a command writes
  into ``OUT``. A second ``ocnopt bench`` / ``ocnopt report`` on the same folder fails at once
  with a :class:`BenchError` naming the holder (pid, host, command, start time, read from
  ``OUT/.ocnopt-bench.holder.json``). The operating system drops the lock when its process
  dies, so a killed run leaves no stale lock behind (the holder file may stay; it is only
  informative).
* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`write_json` write to a temporary
  file with a name unique to the process and call (``tempfile.mkstemp`` in the target folder),
  flush it, then ``os.replace`` it over the target: a reader never sees a half-written file and
  two writers never share a temporary file.
* :func:`check_writable` creates ``OUT`` and writes, syncs and removes a probe file there, and
  requires :data:`MIN_FREE_MB` of free space, so that a read-only or full folder fails with one
  line before any training starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "HOLDER_NAME",
    "LOCK_NAME",
    "MIN_FREE_MB",
    "BenchError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "output_lock",
    "write_json",
]

LOCK_NAME = ".ocnopt-bench.lock"
HOLDER_NAME = ".ocnopt-bench.holder.json"
#: Free space (MiB) an output folder must have before a suite starts.
MIN_FREE_MB = 64


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (the message says why); the CLI prints it cleanly."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (unique temporary file in the same folder, then
    ``os.replace``); the folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (no NaN), indented, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def check_writable(out: Path, min_free_mb: float = MIN_FREE_MB) -> None:
    """Create ``out`` and prove it writable (probe file written, synced, removed) with at least
    ``min_free_mb`` MiB free; :class:`BenchError` with one line otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".ocnopt-write-probe.")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free_mb = shutil.disk_usage(out).free / 2**20
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise BenchError(f"output folder {out} is not writable: {reason}") from None
    if free_mb < min_free_mb:
        raise BenchError(f"output folder {out} is (nearly) full: {free_mb:.1f} MiB free, "
                         f"need at least {min_free_mb:g} MiB")


def _describe_holder(out: Path) -> str:
    try:
        h = json.loads((out / HOLDER_NAME).read_text(encoding="utf-8"))
        return (f"pid {h['pid']} on {h['host']}, `{h['command']}`, started {h['started_at']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


_HELD: dict[Path, int] = {}  # output folders this process holds -> nesting depth


@contextlib.contextmanager
def output_lock(out: Path, command: str | None = None) -> Iterator[None]:
    """Hold the exclusive lock of output folder ``out`` (created if needed) while the block runs.

    Re-entrant within a process (``ocnopt bench`` holds it around the suite and the report).
    Raises :class:`BenchError` at once, naming the holder, if another process holds it, or if
    the folder cannot be written.
    """
    from filelock import FileLock, Timeout

    key = Path(out).resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock = FileLock(str(key / LOCK_NAME), timeout=0)
    try:
        key.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise BenchError(
            f"output folder {out} is in use by another ocnopt process ({_describe_holder(key)});"
            " wait for it to finish or choose another --out") from None
    except OSError as exc:
        raise BenchError(f"output folder {out} is not writable: "
                         f"{exc.strerror or type(exc).__name__}") from None
    holder = key / HOLDER_NAME
    _HELD[key] = 1
    try:
        write_json(holder, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "command": command or " ".join(["ocnopt", *sys.argv[1:]]),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            holder.unlink()
        lock.release()
