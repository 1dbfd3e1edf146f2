"""One job per output directory: rank 0 holds an exclusive ``flock`` on ``<output_dir>/.ds_loradrop.lock``
for as long as the job runs.

A second job on the same directory (a requeue racing a manual relaunch) cannot take it and is refused
with the holder named. The kernel drops a ``flock`` when its process dies — SIGKILL, the OOM killer — so a
lock left by a dead job never blocks a restart. On a shared file system whose node died, the lock goes
with the node's client (NFSv4 leases expire, Lustre evicts the client); the file's content (host, pid,
start) is only what the refusal says, never what decides.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from ds_loradrop.errors import UsageError

LOCK_NAME = ".ds_loradrop.lock"
_held: dict[str, int] = {}  # output directory -> open descriptor, kept open for the job's lifetime


def lock_output_dir(output_dir: str) -> None:
    """Take the directory's lock for this process (idempotent), creating the directory.

    Raises:
        UsageError: another live job holds it.
    """
    key = os.path.realpath(output_dir)
    if key in _held:
        return
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(descriptor)
        os.close(descriptor)
        raise UsageError(
            f"output directory {output_dir!r} is in use by another job ({holder}); wait for it to end, stop "
            "it, or choose another --output_dir"
        ) from None
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)
    _held[key] = descriptor


def unlock_output_dir(output_dir: str) -> None:
    descriptor = _held.pop(os.path.realpath(output_dir), None)
    if descriptor is not None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def _describe(descriptor: int) -> str:
    try:
        record = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
