"""``python [-u] script args`` for the tests' jobs, forked from a server that has already imported torch,
DeepSpeed, transformers and the project (``tests/preload_server.py``): each job process starts in ~0.1 s
instead of spending ~7 s of CPU importing them, which a suite of ~100 job processes on two cores feels.

    python tests/preloaded_python.py [-u] script.py [args ...]

The server's socket is named by ``$DS_LORADROP_TEST_PRELOAD`` (conftest starts one server per pytest
worker); without it, or when no server answers, this process becomes ``python [-u] script args`` itself
(``exec``). What the job sees is what a started interpreter gives it: these argv, environment, working
directory and standard streams (passed as file descriptors), ``sys.path[0]`` the script's folder, its
exit status or signal as this process's own; SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1/2 sent to this
process go to the job, and the server kills the job when this process dies.

What differs from a fresh interpreter (why tests that are about processes keep ``sys.executable``): the
job's parent is the server and ``/proc/PID/cmdline`` and ``environ`` are the server's; modules that read
the environment when imported have read the server's (conftest starts it with the tests' environment);
every job shares the server's string-hash seed. Imports only the standard library.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time

SOCKET_VARIABLE = "DS_LORADROP_TEST_PRELOAD"
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_HEADER = struct.Struct("!Q")


def send_message(connection: socket.socket, message: dict, fds: list[int] = ()) -> None:
    payload = json.dumps(message).encode()
    data = _HEADER.pack(len(payload)) + payload
    if fds:
        sent = socket.send_fds(connection, [data], list(fds))
        data = data[sent:]
    connection.sendall(data)


def receive_message(connection: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """Exactly one message (never a byte of the next: a job's status can follow its pid at once) and the
    file descriptors sent with it; (None, fds) when the peer closed before a whole message."""
    first, fds = b"", []
    if max_fds:  # the descriptors come with the message's first bytes
        first, fds, _, _ = socket.recv_fds(connection, _HEADER.size, max_fds)
        if not first:
            return None, fds
    header = _receive_exactly(connection, _HEADER.size, first)
    if header is None:
        return None, fds
    payload = _receive_exactly(connection, _HEADER.unpack(header)[0])
    return (None if payload is None else json.loads(payload)), fds


def _receive_exactly(connection: socket.socket, size: int, data: bytes = b"") -> bytes | None:
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _connect(path: str, wait_s: float = 120.0) -> socket.socket | None:
    """The server's socket, waiting while it is still importing; None when there is none to wait for."""
    deadline = time.monotonic() + wait_s
    pending = path + ".starting"  # there while the server imports; removed once it listens
    while True:
        importing = os.path.exists(pending)  # looked at first: absent means listening (or gone) by now
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(path)
            return connection
        except OSError:
            connection.close()
        if not importing or time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _become_python(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, *argv])


def main(argv: list[str]) -> int:
    unbuffered = bool(argv) and argv[0] == "-u"
    script_argv = argv[1:] if unbuffered else argv
    path = os.environ.get(SOCKET_VARIABLE)
    connection = _connect(path) if path and script_argv else None
    if connection is None:
        _become_python(argv)
    job: list[int] = []  # its pid once the server has forked it
    early: list[int] = []  # signals that came before: sent to the job as soon as it exists

    def forward(received: int, _frame) -> None:
        if not job:
            early.append(received)
            return
        try:
            os.kill(job[0], received)
        except ProcessLookupError:  # it has just ended: its status is on the way
            pass

    for number in FORWARDED_SIGNALS:
        signal.signal(number, forward)
    request = {"argv": script_argv, "env": dict(os.environ), "cwd": os.getcwd(), "unbuffered": unbuffered}
    send_message(connection, request, [0, 1, 2])
    started, _ = receive_message(connection)
    if started is None:  # the server did not fork it: run it here
        if early:
            signal.signal(early[0], signal.SIG_DFL)
            os.kill(os.getpid(), early[0])
        _become_python(argv)
    job.append(started["pid"])
    for number in early:
        forward(number, None)
    ended, _ = receive_message(connection)
    if ended is None:
        print(f"error: the preload server ended before job {job[0]} reported its status", file=sys.stderr)
        return 1
    status = ended["status"]  # os.waitstatus_to_exitcode: -N for a signal
    if status < 0:
        try:
            signal.signal(-status, signal.SIG_DFL)  # SIGKILL and SIGSTOP have no handler to reset
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
