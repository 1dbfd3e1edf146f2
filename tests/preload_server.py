"""The server behind ``tests/preloaded_python.py``: imports what every job of the suite imports, then forks
one child per request, which becomes that job (``runpy``, as ``python script`` runs it).

    python tests/preload_server.py SOCKET

Listens on ``SOCKET`` once its imports are done and then removes ``SOCKET.starting`` (made by whoever
starts it, so that jobs wait for the server rather than start without it), also when it fails. One
thread (and jemalloc's) and no thread pool started before a fork (checked: forking a process with threads
can leave a lock held in the child). It ends when its parent (the pytest worker) ends or on SIGTERM,
killing any job still running.
"""

from __future__ import annotations

import io
import os
import runpy
import select
import signal
import socket
import sys

from preloaded_python import receive_message, send_message

# launch/train.py's imports at start, what its ranks import while running (DeepSpeed's engine pulls
# torch._inductor in through its Muon optimizer at initialize; rank 0 tracks with MLflow and scores), and
# the other entry points'
PRELOADED = (
    "ds_loradrop.recipes.cli",
    "ds_loradrop.recipes.train",
    "ds_loradrop.recipes.evaluate",
    "ds_loradrop.recipes.generate",
    "deepspeed.runtime.engine",
    "torch._inductor.config",
    "transformers.models.llama.modeling_llama",
    "mlflow",
    "sacrebleu",
    "rouge_score.rouge_scorer",
)


def _preload() -> None:
    import importlib
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError as error:  # a module this checkout lacks is then imported by the job itself
            print(f"preload: {name} not imported: {error}", file=sys.stderr)


def _threads() -> int:
    """This process's threads but jemalloc's background one (pyarrow's allocator, through datasets), which
    jemalloc's own fork handlers make safe."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as handle:
            names.append(handle.read().strip())
    return sum(name != "jemalloc_bg_thd" for name in names)


def _become_job(request: dict, fds: list[int]) -> None:
    """In the forked child: this process becomes ``python script args`` with the request's streams,
    environment and working directory. Returns to the caller only to exit."""
    for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(
            signal_number, signal.default_int_handler if signal_number == signal.SIGINT else signal.SIG_DFL
        )
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    _standard_streams(unbuffered=request["unbuffered"] or bool(request["env"].get("PYTHONUNBUFFERED")))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = request["env"].get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    if threads != SERVER_THREADS:  # OpenMP read the server's value when torch was imported
        import torch

        torch.set_num_threads(int(threads))
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


def _standard_streams(unbuffered: bool) -> None:
    """New ``sys.stdin/stdout/stderr`` over descriptors 0-2, buffered as a fresh interpreter buffers them
    (``-u``: not at all; a terminal: by line; stderr: by line)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        interactive = os.isatty(fd)
        raw_unbuffered = unbuffered and mode == "w"
        binary = open(fd, mode + "b", 0 if raw_unbuffered else -1, closefd=False)  # noqa: SIM115 - the process's
        stream = io.TextIOWrapper(
            binary,
            encoding=getattr(sys, name).encoding,
            errors="backslashreplace" if name == "stderr" else getattr(sys, name).errors,
            line_buffering=mode == "w" and (interactive or name == "stderr") and not raw_unbuffered,
            write_through=raw_unbuffered,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def serve(path: str) -> None:
    """Accept requests until the parent ends; returns in each forked child, which then runs its job."""
    starting = path + ".starting"
    try:
        _preload()
        parent = os.getppid()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
    finally:
        if os.path.exists(starting):
            os.unlink(starting)
    jobs: dict[int, socket.socket] = {}  # pid -> the client's connection
    clients: dict[socket.socket, int] = {}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop and os.getppid() == parent:
            readable, _, _ = select.select([listener, *clients], [], [], 0.1)
            for connection in readable:
                if connection is listener:
                    client, _ = listener.accept()
                    request, fds = receive_message(client, max_fds=3)
                    if request is None or len(fds) != 3:
                        client.close()
                        for fd in fds:
                            os.close(fd)
                        continue
                    threads = _threads()
                    if threads != 1:  # never fork with threads: the stand-in runs a plain interpreter
                        print(f"preload: {threads} threads, not forking", file=sys.stderr)
                        for fd in fds:
                            os.close(fd)
                        client.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        for other in clients:
                            other.close()
                        client.close()
                        _become_job(request, fds)
                        return
                    for fd in fds:
                        os.close(fd)
                    send_message(client, {"pid": pid})
                    jobs[pid], clients[client] = client, pid
                else:  # a client that wrote or closed: it died, so its job goes too
                    if not connection.recv(1):
                        _kill(clients.pop(connection), signal.SIGKILL)
                        connection.close()
            _reap(jobs, clients)
    finally:
        if os.getpid() == _server_pid:
            for pid in list(jobs):
                _kill(pid, signal.SIGKILL)
            listener.close()
            if os.path.exists(path):
                os.unlink(path)


def _kill(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


def _reap(jobs: dict, clients: dict) -> None:
    while jobs:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        client = jobs.pop(pid, None)
        if client is None:
            continue
        if client in clients:
            clients.pop(client)
            try:
                send_message(client, {"status": os.waitstatus_to_exitcode(status)})
            except OSError:
                pass
            client.close()


_server_pid = os.getpid()
# One OpenMP / BLAS thread here: with more, importing torch starts BLAS thread pools and the server would
# have threads to fork. A job's own OMP_NUM_THREADS (else as many as it has CPUs) is set when it starts.
SERVER_THREADS = "1"

if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = SERVER_THREADS
    serve(sys.argv[1])
