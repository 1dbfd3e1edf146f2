"""The method registry: one object per ``--method``, nothing else compares method names, and a new method
is one module plus one registration."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from conftest import REPO_ROOT, randomize_adapters, tiny_llama_model

from ds_loradrop.errors import UsageError
from ds_loradrop.method import registry
from ds_loradrop.method.registry import Method, get_method, register, registered_methods
from ds_loradrop.recipes.cli import parse_run_config

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(REPO_ROOT)
# Where method names may be compared: the registry and the methods' own modules.
METHOD_HOMES = (ROOT / "ds_loradrop" / "method" / "registry.py", ROOT / "ds_loradrop" / "method" / "kinds")


def method_name_comparisons(path: pathlib.Path, names: set[str]) -> list[str]:
    """``x == "vera"``, ``m in ("lora", "loradrop")``, ``match``-free: every comparison with a method name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        constants = []
        for operand in operands:
            if isinstance(operand, ast.Constant):
                constants.append(operand.value)
            elif isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
                constants += [e.value for e in operand.elts if isinstance(e, ast.Constant)]
        hits = sorted(name for name in constants if isinstance(name, str) and name in names)
        if hits:
            where = path.relative_to(ROOT) if ROOT in path.parents else path
            found.append(f"{where}:{node.lineno} compares with {hits}")
    return found


def test_no_method_name_is_compared_outside_the_registry():
    names = set(registered_methods())
    files = sorted([*(ROOT / "ds_loradrop").rglob("*.py"), *(ROOT / "launch").rglob("*.py")])
    homes = [p for p in files if p == METHOD_HOMES[0] or METHOD_HOMES[1] in p.parents]
    assert len(homes) == 1 + len(names) + 1  # registry.py, one module per method, kinds/__init__.py
    found = [hit for path in files if path not in homes for hit in method_name_comparisons(path, names)]
    assert not found, "\n".join(found)


def test_the_scan_sees_a_comparison(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def probe(cfg):\n    return cfg.finetuning.method in ("vera", "x") or cfg == "lora"\n')
    assert method_name_comparisons(probe, {"vera", "lora"}) == [
        f"{probe}:2 compares with ['vera']",
        f"{probe}:2 compares with ['lora']",
    ]


def test_every_method_is_registered_with_its_settings():
    methods = registered_methods()
    assert list(methods) == ["full", "lora", "loradrop", "sparse_lora", "tied_lora", "vera"]
    owners = {flag: name for name, method in methods.items() for flag in method.flags}
    assert owners == {
        "vera_r": "vera",
        "vera_d_initial": "vera",
        "vera_projection_seed": "vera",
        "tied_lora_r": "tied_lora",
        "sparsity": "sparse_lora",
        "snip_examples": "sparse_lora",
    }
    assert [n for n, m in methods.items() if m.learns_layout] == ["loradrop"]
    assert [n for n, m in methods.items() if not m.trains_adapters] == ["full"]
    assert [n for n, m in methods.items() if not m.peft_expressible] == ["full", "tied_lora"]
    assert [n for n, m in methods.items() if m.lora_pairs] == ["lora", "loradrop", "sparse_lora"]


def test_unknown_method_and_foreign_flags_are_one_error(tiny_run_args):
    with pytest.raises(SystemExit):  # argparse's choices, listing the registered ones
        parse_run_config([*tiny_run_args, "--method", "dora"])
    with pytest.raises(UsageError, match="unknown --method 'dora'; expected one of"):
        get_method("dora")
    with pytest.raises(UsageError, match="--vera_r is a setting of --method vera; this run is --method lora"):
        parse_run_config([*tiny_run_args, "--method", "lora", "--vera_r", "4"])
    with pytest.raises(UsageError, match="--stop_after_stage1 needs a stage 1"):
        parse_run_config([*tiny_run_args, "--method", "vera", "--stop_after_stage1"])


def test_registering_twice_or_taking_another_methods_flag_is_refused():
    class Again(Method):
        name = "lora"

    class Thief(Method):
        name = "thief"
        flags = ("sparsity",)

    registered_methods()
    with pytest.raises(ValueError, match="registered twice"):
        register(Again())
    with pytest.raises(ValueError, match="claims flags of another method"):
        register(Thief())


def rebuilt_from_files(layout, settings: dict, directory: str):
    """A fresh tiny model with the adapters of ``layout`` saved to ``directory`` and read back."""
    from ds_loradrop.method.adapter_files import attach_saved_adapters, save_adapters

    save_adapters(layout, directory, settings=settings, base_model="tiny", plan=None)
    again = tiny_llama_model()
    attach_saved_adapters(again, directory)
    return again


@pytest.fixture
def half_lora():
    """A new method as a user would add one: a class and one registration (removed afterwards)."""
    from ds_loradrop.method.kinds.lora import LoRA
    from ds_loradrop.method.placement import attach_own_adapters

    class HalfRankLoRA(LoRA):
        name = "half_lora"
        summary = "LoRA at half the rank"

        def attach(self, cfg, preparation, output_dir):
            lora = cfg.lora
            return lambda layout: attach_own_adapters(
                layout, lora.lora_r // 2, lora.lora_alpha / 2, lora.lora_dropout
            )

        def adapter_settings(self, lora):
            return {
                **super().adapter_settings(lora),
                "r": lora.lora_r // 2,
                "lora_alpha": lora.lora_alpha / 2,
            }

    registered_methods()
    register(HalfRankLoRA())
    yield get_method("half_lora")
    registry._REGISTRY.pop("half_lora")


def test_a_new_method_is_one_class_and_one_registration(half_lora, tiny_run_args, tmp_path):
    """Registered, it is a --method value, attaches its adapters, and its adapter files rebuild."""
    from ds_loradrop.method.placement import inject_lora
    from ds_loradrop.method.registry import Preparation

    cfg = parse_run_config([*tiny_run_args, "--method", "half_lora"])
    assert (cfg.finetuning.method, cfg.lora.lora_r) == ("half_lora", 8)
    model = tiny_llama_model()
    layout = inject_lora(model, cfg.lora.target_names)
    half_lora.attach(cfg, Preparation(), str(tmp_path))(layout)
    assert layout["q_proj"][0].adapter.lora_A.shape[0] == 4
    randomize_adapters(model)
    again = rebuilt_from_files(layout, half_lora.adapter_settings(cfg.lora), str(tmp_path / "adapter"))
    tokens = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(again(tokens).logits, model(tokens).logits)


def _sparse_masks(cfg) -> dict[str, torch.Tensor]:
    """SNIP-like masks for ``cfg``'s layout (random scores, half the entries kept)."""
    from ds_loradrop.method.placement import inject_lora
    from ds_loradrop.method.sparse_lora import attach_sparse_adapters, global_keep_masks, sparse_adapters

    layout = inject_lora(tiny_llama_model(), cfg.lora.target_names)
    attach_sparse_adapters(layout, cfg.lora.lora_r, cfg.lora.lora_alpha)
    generator = torch.Generator().manual_seed(0)
    scores = {
        f"{name}.mask_{key}": torch.rand(getattr(adapter, f"lora_{key}").shape, generator=generator)
        for name, adapter in sparse_adapters(layout).items()
        for key in ("A", "B")
    }
    return global_keep_masks(scores, 0.5)


@pytest.mark.parametrize(
    "method, flags",
    [
        ("lora", []),
        ("vera", ["--vera_r", "8"]),
        ("tied_lora", ["--tied_lora_r", "4"]),
        ("sparse_lora", ["--sparsity", "0.5"]),
    ],
)
def test_every_methods_adapter_files_rebuild_the_trained_model(method, flags, tiny_run_args, tmp_path):
    """Attach, change every trainable tensor, save, rebuild on a fresh model: the same logits (a tensor the
    method's ``rebuild`` forgets to copy would be left at its initial value)."""
    from ds_loradrop.method.placement import freeze_all_but_adapters, inject_lora
    from ds_loradrop.method.registry import Preparation

    cfg = parse_run_config([*tiny_run_args, "--method", method, *flags])
    chosen = get_method(method)
    preparation = Preparation(masks=_sparse_masks(cfg) if method == "sparse_lora" else None)
    model = tiny_llama_model()
    layout = inject_lora(model, cfg.lora.target_names)
    torch.manual_seed(3)
    chosen.attach(cfg, preparation, str(tmp_path))(layout)
    freeze_all_but_adapters(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    again = rebuilt_from_files(layout, chosen.adapter_settings(cfg.lora), str(tmp_path / "adapter"))
    tokens = torch.arange(12).unsqueeze(0)
    expected = model(tokens).logits
    assert (expected - tiny_llama_model()(tokens).logits).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(again(tokens).logits, expected)
