"""The fine-tuning methods: one :class:`Method` object per ``--method`` value, registered by name.

Everything that differs between methods is asked of the method object (its settings, what it prepares
before its final training, which adapters it attaches, what its adapter files record and how they are
rebuilt, its PEFT export); no other module compares method names (``tests/test_method_registry.py`` keeps
it so).

Adding a method is one module and one registration: a module in ``method/kinds/`` with a :class:`Method`
subclass that ends with ``register(TheMethod())``, and its import in ``method/kinds/__init__.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from ds_loradrop.config import LoraConfig, RunConfig
from ds_loradrop.errors import UsageError
from ds_loradrop.method.lora import AdapterLayout
from ds_loradrop.method.plan import Plan
from ds_loradrop.training.loop import StageResult

if TYPE_CHECKING:
    from peft import PeftConfig

AttachAdapters = Callable[[AdapterLayout], None]
# (adapter name, the LoRALinear it serves) -> the adapter module, its saved tensors copied in.
RebuildAdapter = Callable[[str, torch.nn.Module], torch.nn.Module]
# Saved tensor names -> the tensors; UsageError naming the absent ones.
NeedTensors = Callable[..., list[torch.Tensor]]


@dataclass
class Preparation:
    """What a method's final training takes from before it (a LoRA-drop plan, SNIP's masks, or nothing)
    and the stages that ran for it in this process."""

    plan: Plan | None = None
    masks: dict[str, torch.Tensor] | None = None
    stages: list[StageResult] = field(default_factory=list)


class StageTools(Protocol):
    """What the training recipe lends a method to prepare (``ds_loradrop.recipes.stages``)."""

    def build_model(self, ctx, attach: AttachAdapters | None, seed: int): ...

    def train_model(self, ctx, built, examples: list[dict], **options): ...


class Method:
    """One fine-tuning method. The defaults are plain LoRA's; subclasses override what differs."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help and the README
    flags: ClassVar[tuple[str, ...]] = ()  # the LoraConfig fields only this method takes
    trains_adapters: ClassVar[bool] = True  # False: every weight trains (full fine-tuning)
    lora_pairs: ClassVar[bool] = False  # adapters are LoRA pairs (A, B): importance can be measured on them
    learns_layout: ClassVar[bool] = False  # a stage 1 decides the layout (--plan, --stop_after_stage1, ...)
    has_alpha: ClassVar[bool] = True  # the update is scaled by lora_alpha / r
    peft_expressible: ClassVar[bool] = True  # PEFT has this method: --format peft exports it

    # -- settings ------------------------------------------------------------------------------------------
    def fill_settings(self, lora: LoraConfig, task_lora_r: int) -> None:
        """Check this method's settings and fill their defaults (LoRA's: the task's rank, alpha = 2 r)."""
        if lora.lora_r is None:
            lora.lora_r = task_lora_r
        if lora.lora_alpha is None:
            lora.lora_alpha = 2.0 * lora.lora_r

    def adapter_settings(self, lora: LoraConfig) -> dict:
        """What the adapter files record besides tensors, to rebuild this method's adapters."""
        return {"method": self.name, "r": lora.lora_r, "lora_alpha": lora.lora_alpha}

    def has_stage1(self, cfg: RunConfig) -> bool:
        """Whether this run trains a stage 1 before its final training."""
        return self.learns_layout and cfg.drop.plan is None

    def evaluates_base_in_final_stage(self, cfg: RunConfig) -> bool:
        """Whether the final training evaluates the base model first (else an earlier stage did)."""
        return not self.has_stage1(cfg)

    # -- before the final training -------------------------------------------------------------------------
    def finished_preparation(self, output_dir: str) -> str | None:
        """The file a finished preparation left in ``output_dir`` (kept across a resume), if any."""
        return None

    def prepare(self, ctx, tools: StageTools) -> Preparation:
        """Run (or take from a resumed run) what the final training needs: nothing for plain LoRA."""
        return Preparation()

    def logged_model_form(self) -> str | None:
        """What a run logs as its MLflow model: ``"peft"`` (the PEFT export over a reference to the base
        model), ``"checkpoint"`` (the whole saved model) or None (nothing a transformers pipeline loads)."""
        if not self.trains_adapters:
            return "checkpoint"
        return "peft" if self.peft_expressible else None

    # -- the final training --------------------------------------------------------------------------------
    def attach(self, cfg: RunConfig, preparation: Preparation, output_dir: str) -> AttachAdapters | None:
        """How to attach the adapters the final training trains (None: no adapters, every weight trains)."""
        lora = cfg.lora
        from ds_loradrop.method.placement import attach_own_adapters

        return lambda layout: attach_own_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout)

    # -- saved adapters ------------------------------------------------------------------------------------
    def rebuild(self, config: dict, need: NeedTensors) -> RebuildAdapter:
        """A function (name, wrapper) -> an adapter of this method with its saved tensors."""
        from ds_loradrop.method.lora import LoRAAdapter

        return lora_rebuilder(LoRAAdapter, ("lora_A", "lora_B"), config, need)

    def peft_export(self, model, config: dict, modules: list[str]) -> tuple[dict, PeftConfig]:
        """PEFT's state dict and config for the adapted ``modules`` of ``model`` (a shared adapter copied to
        every layer that uses it). Only asked of methods with ``peft_expressible``."""
        from peft import LoraConfig as PeftLoraConfig

        state = {}
        for name in modules:
            tensors = model.get_submodule(name).adapter.saved_tensors()
            for key in ("lora_A", "lora_B"):
                state[f"base_model.model.{name}.{key}.weight"] = tensors[key].detach().clone().contiguous()
        peft_config = PeftLoraConfig(
            r=config["r"],
            lora_alpha=config["lora_alpha"],
            target_modules=modules,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=config["base_model"],
        )
        return state, peft_config


def lora_rebuilder(kind, keys: tuple[str, ...], config: dict, need: NeedTensors) -> RebuildAdapter:
    """Rebuild LoRA-shaped adapters of class ``kind`` whose tensors are ``keys`` (shared ones marked)."""

    def rebuild(name: str, wrapper) -> torch.nn.Module:
        adapter = kind(wrapper.in_features, wrapper.out_features, config["r"], config["lora_alpha"])
        adapter.is_shared = name.endswith(".shared")
        with torch.no_grad():
            for key, value in zip(keys, need(*[f"{name}.{key}" for key in keys])):
                getattr(adapter, key).copy_(value)
        return adapter

    return rebuild


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` a ``--method`` value (its flags owned by it)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    owners = {flag: other.name for other in _REGISTRY.values() for flag in other.flags}
    taken = [flag for flag in method.flags if flag in owners]
    if taken:
        raise ValueError(f"method {method.name!r} claims flags of another method: {taken}")
    _REGISTRY[method.name] = method
    return method


def registered_methods() -> dict[str, Method]:
    """Every registered method by name, in registration order."""
    importlib.import_module("ds_loradrop.method.kinds")  # the modules register themselves on import
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    """The method registered as ``name``; UsageError naming the known ones otherwise."""
    methods = registered_methods()
    if name not in methods:
        raise UsageError(f"unknown --method {name!r}; expected one of {list(methods)}")
    return methods[name]


def with_method_settings(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its method's settings checked and filled: a flag of another method, an out-of-range
    value or ``--stop_after_stage1`` without a stage 1 is one UsageError."""
    method = get_method(cfg.finetuning.method)
    for other in registered_methods().values():
        for flag in other.flags:
            if other is not method and getattr(cfg.lora, flag) is not None:
                raise UsageError(
                    f"--{flag} is a setting of --method {other.name}; this run is --method {method.name}"
                )
    method.fill_settings(cfg.lora, cfg.data.build_task().default_lora_r)
    if cfg.tracking.mlflow_register_model is not None and method.logged_model_form() is None:
        raise UsageError(
            f"--mlflow_register_model: a {method.name} run has no form MLflow's transformers flavour loads "
            f"(PEFT has no {method.name}); export it with launch/export.py --format merged instead"
        )
    if cfg.drop.stop_after_stage1 and not method.has_stage1(cfg):
        given = f"--method {method.name}" + (" with --plan" if cfg.drop.plan is not None else "")
        raise UsageError(
            f"--stop_after_stage1 needs a stage 1: --method loradrop without --plan (got {given})"
        )
    return cfg
