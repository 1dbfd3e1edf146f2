"""Every entry point answers ``--help`` (usage and the first line of its description, exit 0, no
traceback), as a new user tries it first."""

from __future__ import annotations

import glob
import os
import runpy
import sys

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.unit


def entry_points() -> list[str]:
    scripts = []
    for folder in ("launch", "bench", "repro"):
        for path in sorted(glob.glob(os.path.join(REPO_ROOT, folder, "*.py"))):
            with open(path) as handle:
                if 'if __name__ == "__main__":' in handle.read():
                    scripts.append(os.path.relpath(path, REPO_ROOT))
    return scripts


def test_the_entry_points_are_found():
    assert {"launch/train.py", "launch/evaluate.py", "launch/restart.py", "repro/study.py"} <= set(
        entry_points()
    )


@pytest.mark.parametrize("script", entry_points())
def test_every_entry_point_answers_help(script, monkeypatch, capsys):
    """In-process (``runpy``, as ``python SCRIPT --help`` runs it), so that 20 scripts cost one import of
    torch and DeepSpeed, not 20."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.syspath_prepend(os.path.dirname(os.path.join(REPO_ROOT, script)))  # as python does
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(os.path.join(REPO_ROOT, script), run_name="__main__")
    assert stopped.value.code in (0, None)
    out = capsys.readouterr().out
    # (DeepSpeed prints its accelerator line before argparse when it is imported first)
    assert any(line.startswith("usage:") for line in out.splitlines()), out[-2000:]
