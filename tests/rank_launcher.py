"""The smallest launcher: start N ranks of a script on this machine with the environment ``deepspeed``
gives them, wait, and exit with the first non-zero status of a rank (its signal as 128 + n, as a shell
reports it). Imports only the standard library: about 50 ms where the ``deepspeed`` launcher costs an
interpreter importing torch and DeepSpeed (~8-10 s here). For jobs whose launcher is not under test;
``deepspeed``, ``torchrun`` and ``launch/node_launch.sh`` are tested where they are the subject.

    python tests/rank_launcher.py [--preloaded] --ranks 2 --master_port P script.py [args ...]

``--preloaded``: each rank is started by ``tests/preloaded_python.py`` (forked from the session's preload
server, its imports done) rather than a new interpreter.

Each rank's output is written to a file and copied to this process's stdout / stderr in rank order when
all have ended (a rank blocked on a full pipe would stall its peers' collectives). A rank that fails
makes the others be terminated, as the ``deepspeed`` launcher does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

PRELOADED_PYTHON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preloaded_python.py")


def main(argv: list[str]) -> int:
    preloaded = bool(argv) and argv[0] == "--preloaded"
    argv = argv[1:] if preloaded else argv
    if len(argv) < 5 or argv[0] != "--ranks" or argv[2] != "--master_port":
        usage = "usage: rank_launcher.py [--preloaded] --ranks N --master_port P script.py [args ...]"
        print(usage, file=sys.stderr)
        return 2
    ranks, port, script, args = int(argv[1]), argv[3], argv[4], argv[5:]
    shared = {**os.environ, "WORLD_SIZE": str(ranks), "LOCAL_SIZE": str(ranks), "CROSS_RANK": "0"}
    shared.update({"CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    logs = tempfile.mkdtemp(prefix="ranks-")
    started = []
    try:
        for rank in range(ranks):
            out = open(os.path.join(logs, f"{rank}.out"), "w+b")  # noqa: SIM115 - closed below
            err = open(os.path.join(logs, f"{rank}.err"), "w+b")  # noqa: SIM115 - closed below
            python = [sys.executable, PRELOADED_PYTHON] if preloaded else [sys.executable]
            command = [*python, "-u", script, f"--local_rank={rank}", *args]
            environment = {**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            started.append((subprocess.Popen(command, env=environment, stdout=out, stderr=err), out, err))
        status = 0
        while any(process.poll() is None for process, _, _ in started):
            failed = [process.returncode for process, _, _ in started if process.returncode not in (None, 0)]
            if failed and not status:
                status = failed[0]
                for process, _, _ in started:
                    if process.poll() is None:
                        process.terminate()
            time.sleep(0.2)
        if not status:
            status = next((p.returncode for p, _, _ in started if p.returncode != 0), 0)
        for _, out, err in started:
            out.seek(0), err.seek(0)
            sys.stdout.buffer.write(out.read())
            sys.stderr.buffer.write(err.read())
            out.close(), err.close()
        sys.stdout.flush(), sys.stderr.flush()
        return 128 - status if status < 0 else status
    finally:
        for process, _, _ in started:
            if process.poll() is None:
                process.kill()
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
