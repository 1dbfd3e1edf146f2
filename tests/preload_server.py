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

import gc
import os
import runpy
import select
import signal
import socket
import sys
import warnings

from preloaded_python import FORWARDED_SIGNALS, receive_message, send_message

# launch/train.py's imports at start, what its ranks import while running (DeepSpeed's engine imports its
# Muon optimizer, and through it torch._inductor, at initialize: 1.6 s; rank 0 tracks with MLflow, to a
# SQLite store in most tests: 1.7 s, plots with matplotlib and scores), and the other entry points'
PRELOADED = (
    "ds_loradrop.recipes.cli",
    "ds_loradrop.recipes.train",
    "ds_loradrop.recipes.evaluate",
    "ds_loradrop.recipes.generate",
    "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "torch._inductor.config",
    "transformers.models.llama.modeling_llama",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "ds_loradrop.tracking.plots",
    "sacrebleu",
    "rouge_score.rouge_scorer",
)


def _preload() -> None:
    import importlib

    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError as error:  # a module this checkout lacks is then imported by the job itself
            print(f"preload: {name} not imported: {error}", file=sys.stderr)
    # What the imports made lives as long as the jobs: out of the collector's reach (gc.freeze), a job's full
    # collections (DeepSpeed's ZeRO-3 defragments with gc.collect: 0.5 s each over the imported heap) walk
    # only what the job made, and leave the shared pages uncopied.
    gc.collect()
    gc.freeze()


def _fork_unsafe_state() -> str | None:
    """Why this process must not fork now, or None: a thread but jemalloc's background one (pyarrow's
    allocator, through datasets; jemalloc's own fork handlers make it safe), or CUDA initialised."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as handle:
                names.append(handle.read().strip())
        except FileNotFoundError:  # a thread that has just ended
            pass
    threads = sum(name != "jemalloc_bg_thd" for name in names)
    if threads != 1:
        return f"{threads} threads"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA initialised"
    return None


def _become_job(request: dict, fds: list[int]) -> None:
    """In the forked child (the forwarded signals still blocked): this process becomes ``python script
    args`` with the request's streams, environment and working directory. Returns only to exit."""
    for number in FORWARDED_SIGNALS + (signal.SIGCHLD,):
        signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # one sent meanwhile acts now
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    _buffer_streams(unbuffered=request["unbuffered"] or bool(request["env"].get("PYTHONUNBUFFERED")))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = request["env"].get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    if threads != SERVER_THREADS:  # OpenMP read the server's value when torch was imported
        import torch

        torch.set_num_threads(int(threads))
    warnings.filters[:] = _WARNING_FILTERS  # as before the imports
    try:  # the peak resident set from here on, not the server's (a job's peak memory is logged)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    runpy.run_path(script, run_name="__main__")


def _buffer_streams(unbuffered: bool) -> None:
    """``sys.stdout`` / ``sys.stderr``, now over the job's descriptors, buffered as a fresh interpreter
    buffers them (``-u``: flushed at every write; a terminal: by line; stderr: by line). Reconfigured in
    place: logging handlers made at import hold these objects."""
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        by_line = unbuffered or os.isatty(fd) or stream is sys.stderr
        stream.reconfigure(line_buffering=by_line, write_through=unbuffered)


def _serve_one(client: socket.socket, jobs: dict, clients: dict, listener: socket.socket) -> bool:
    """Read one request and fork its job; True in the forked child (which then runs it)."""
    client.settimeout(30)  # a stand-in that connects and stalls does not hold the server
    request, fds = receive_message(client, max_fds=3)
    client.settimeout(None)
    unsafe = _fork_unsafe_state()
    if request is None or len(fds) != 3 or unsafe:
        if unsafe:  # the stand-in then runs a plain interpreter
            print(f"preload: {unsafe}, not forking", file=sys.stderr)
        for fd in fds:
            os.close(fd)
        client.close()
        return False
    sys.stdout.flush(), sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)  # none lost before the job's handlers
    pid = os.fork()
    if pid == 0:
        listener.close()
        for other in clients:
            other.close()
        client.close()
        _become_job(request, fds)
        return True
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    for fd in fds:
        os.close(fd)
    jobs[pid], clients[client] = client, pid
    send_message(client, {"pid": pid})
    return False


def serve(path: str) -> None:
    """Accept requests until the parent ends; returns in each forked child, after its job."""
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
                    try:
                        if _serve_one(client, jobs, clients, listener):
                            return  # the forked child, its job done
                    except OSError as error:  # that stand-in went away: its job (if forked) goes too
                        print(f"preload: a request failed: {error!r}", file=sys.stderr)
                        if client in clients:
                            _kill(clients.pop(client), signal.SIGKILL)
                        client.close()
                    continue
                try:  # a stand-in never writes after its request: readable means it died
                    alive = connection.recv(1)
                except OSError:
                    alive = b""
                if not alive:
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
        if client is None or client not in clients:
            continue
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
_WARNING_FILTERS = list(warnings.filters)  # a fresh interpreter's, before any import adds its own

if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = SERVER_THREADS
    serve(sys.argv[1])
