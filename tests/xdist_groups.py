"""The suite's pytest-xdist groups (``pytest -n 2 --dist loadgroup``, as .ci/run runs it).

A session fixture is made once per worker, a module fixture once per worker that runs one of the module's
tests: grouping keeps each made once. Every test that reads the shared reference runs (``runs``, and the
MLflow server they track to) goes to one worker; every other test goes with its module. Without ``-n``
the marks change nothing. tests/test_suite_groups.py holds pytest-xdist to it.
"""

from __future__ import annotations

import pytest

SHARED_RUN_FIXTURES = ("runs", "mlflow_server")


def pytest_itemcollected(item) -> None:
    """Marked as each test is collected, before pytest-xdist reads the marks."""
    shared = any(name in getattr(item, "fixturenames", ()) for name in SHARED_RUN_FIXTURES)
    group = "shared_runs" if shared else item.module.__name__
    item.add_marker(pytest.mark.xdist_group(group))
