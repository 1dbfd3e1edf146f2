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
    """One message and the file descriptors sent with it; (None, []) when the peer closed first."""
    if max_fds:
        data, fds, _, _ = socket.recv_fds(connection, 1 << 16, max_fds)
    else:
        data, fds = connection.recv(1 << 16), []
    if not data:
        return None, fds
    while len(data) < _HEADER.size:
        data += _receive_more(connection)
    (length,) = _HEADER.unpack(data[: _HEADER.size])
    while len(data) < _HEADER.size + length:
        data += _receive_more(connection)
    return json.loads(data[_HEADER.size : _HEADER.size + length]), fds


def _receive_more(connection: socket.socket) -> bytes:
    chunk = connection.recv(1 << 16)
    if not chunk:
        raise ConnectionError("the preload server closed the connection mid-message")
    return chunk


def _connect(path: str, wait_s: float = 180.0) -> socket.socket | None:
    """The server's socket, waiting while it is still importing; None when there is none to wait for."""
    deadline = time.monotonic() + wait_s
    pending = path + ".starting"  # there while the server imports
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(path)
            return connection
        except OSError:
            connection.close()
        if not os.path.exists(pending) or time.monotonic() > deadline:
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
    request = {"argv": script_argv, "env": dict(os.environ), "cwd": os.getcwd(), "unbuffered": unbuffered}
    send_message(connection, request, [0, 1, 2])
    started, _ = receive_message(connection)
    if started is None:  # the server went away before forking: run it here
        _become_python(argv)
    job = started["pid"]
    for number in FORWARDED_SIGNALS:
        signal.signal(number, lambda received, _frame: os.kill(job, received))
    ended, _ = receive_message(connection)
    if ended is None:
        print(f"error: the preload server ended before job {job} reported its status", file=sys.stderr)
        return 1
    status = ended["status"]  # os.waitstatus_to_exitcode: -N for a signal
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
