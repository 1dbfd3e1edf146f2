"""The packages import one way: each layer only from the layers below it (the README's architecture)."""

from __future__ import annotations

import ast
import pathlib

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.unit

# Bottom to top; a module may import from its own layer and the layers before it.
LAYERS = (
    "errors",
    "run_files",
    "data",
    "config",
    "training",
    "models",
    "method",
    "eval",
    "tracking",
    "recipes",
)
PACKAGE = pathlib.Path(REPO_ROOT) / "ds_loradrop"


def layer_of(module: str) -> str:
    """``ds_loradrop.method.plan`` -> ``method``; ``ds_loradrop.errors`` -> ``errors``."""
    return module.split(".")[1]


def imports_of(path: pathlib.Path) -> set[str]:
    """Every ds_loradrop module imported anywhere in the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ds_loradrop."):
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "ds_loradrop":
            found.update(f"ds_loradrop.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ds_loradrop."))
    return found


def test_every_module_belongs_to_a_layer():
    tops = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert tops == set(LAYERS), f"modules outside the layers: {sorted(tops - set(LAYERS))}"


def test_imports_point_down_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for module in imports_of(path):
            if LAYERS.index(layer_of(module)) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not upward, "\n".join(upward)


def test_deepspeed_is_imported_by_the_engine_package_only():
    importers = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if any(
            isinstance(n, (ast.Import, ast.ImportFrom))
            and any(
                name.split(".")[0] == "deepspeed"
                for name in ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])
            )
            for n in ast.walk(ast.parse(p.read_text()))
        )
    )
    assert importers and all(name.startswith("training/engine/") for name in importers), importers


def test_every_imported_name_exists():
    """Each ``from ds_loradrop.X import name`` anywhere (function-level imports too, in the library, the
    entry points, the study and the benchmarks) names something X has: a renamed constant whose old name is
    still imported somewhere fails here, not in a slow test that happens to reach the import."""
    import importlib

    roots = [PACKAGE, *(pathlib.Path(REPO_ROOT) / d for d in ("launch", "repro", "bench", "tests"))]
    missing = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                    continue
                if node.module != "ds_loradrop" and not node.module.startswith("ds_loradrop."):
                    continue
                where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
                try:
                    module = importlib.import_module(node.module)
                except ImportError as error:
                    missing.append(f"{where}: {node.module} does not import: {error}")
                    continue
                for alias in node.names:
                    if hasattr(module, alias.name):
                        continue
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        missing.append(f"{where}: {node.module}.{alias.name}")
    assert not missing, "imported names that do not exist:\n" + "\n".join(missing)


def test_bench_has_harness_contenders_and_scripts_apart_without_an_import_cycle():
    """bench/: ``harness`` (measuring) imports no other bench module, ``contenders`` (the timed loops)
    only the harness, scripts import those two and never each other; ``free_port`` is defined once."""
    bench = pathlib.Path(REPO_ROOT) / "bench"
    own = {p.stem for p in bench.glob("*.py")}

    def modules(path):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
        return found & own

    imports = {p.stem: modules(p) for p in bench.glob("*.py")}
    assert imports["harness"] == set()
    assert imports["contenders"] == {"harness"}
    scripts = own - {"harness", "contenders"}
    for script in sorted(scripts):
        # (the profiler of the training benchmark takes that benchmark's command line)
        allowed = {"harness", "contenders"} | (
            {"train_throughput"} if script == "profile_train_step" else set()
        )
        assert imports[script] <= allowed, script
    definitions = [
        str(p.relative_to(REPO_ROOT))
        for root in (PACKAGE, bench, pathlib.Path(REPO_ROOT) / "tests", pathlib.Path(REPO_ROOT) / "launch")
        for p in root.rglob("*.py")
        if any(
            isinstance(n, ast.FunctionDef) and n.name == "free_port"
            for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert definitions == ["ds_loradrop/training/distributed.py"]
