"""pytest-xdist keeps tests/xdist_groups.py's groups: each module on one worker, every reader of the shared
reference runs on one worker, and so the session fixture made once (pytest 9.2 broke this for
pytest-xdist 3.8's --dist loadgroup: hence the pin in pyproject.toml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.integration

CONFTEST = f"""
import json, os, sys
import pytest
sys.path.insert(0, {os.path.join(REPO_ROOT, "tests")!r})
from xdist_groups import pytest_itemcollected  # noqa: F401

@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    with open(os.environ["RECORD"], "a") as handle:
        handle.write(json.dumps({{"made_by": os.environ.get("PYTEST_XDIST_WORKER")}}) + "\\n")
    return "made"

@pytest.fixture(autouse=True)
def record(request):
    yield
    with open(os.environ["RECORD"], "a") as handle:
        entry = {{"test": request.node.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER")}}
        handle.write(json.dumps(entry) + "\\n")
"""

PLAIN = "\n".join(f"def test_{i}():\n    pass\n" for i in range(4))
READER = "\n".join(f"def test_reads_{i}(runs):\n    assert runs == 'made'\n" for i in range(3))


def test_each_module_and_the_shared_runs_stay_on_one_worker(tmp_path):
    for name, text in {
        "conftest.py": CONFTEST,
        "test_a.py": PLAIN,
        "test_b.py": PLAIN,
        "test_c.py": READER,
        "test_d.py": READER,
        "test_e.py": PLAIN + READER,
    }.items():
        (tmp_path / name).write_text(text)
    record = tmp_path / "record.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
         str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "RECORD": str(record)}, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    made = [e for e in entries if "made_by" in e]
    tests = [e for e in entries if "test" in e]
    assert len(tests) == 4 + 4 + 3 + 3 + 7
    assert len(made) == 1, made  # the session fixture made once, on the worker of every reader
    readers = {e["worker"] for e in tests if "test_reads_" in e["test"]}
    assert readers == {made[0]["made_by"]}
    for module in ("test_a.py", "test_b.py"):
        assert len({e["worker"] for e in tests if e["test"].startswith(module)}) == 1, module
    assert {e["worker"] for e in tests} == {"gw0", "gw1"}  # and the work is shared
