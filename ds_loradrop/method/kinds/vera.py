"""``--method vera``: VeRA (Kopiczko et al. 2024), one frozen random pair shared by every layer and
trainable scaling vectors d and b per layer (the LoRA-drop paper's baseline at r = 512)."""

from __future__ import annotations

import math

from ds_loradrop.config import LoraConfig, RunConfig
from ds_loradrop.config.method import DEFAULT_VERA_D_INITIAL, DEFAULT_VERA_R
from ds_loradrop.errors import UsageError
from ds_loradrop.method.registry import Method, Preparation, register
from ds_loradrop.method.vera import PROJECTION_NAME, VeRAAdapter, VeRAProjection, attach_vera_adapters


class VeRA(Method):
    name = "vera"
    summary = "VeRA: a shared frozen random pair, trainable vectors d and b per layer (--vera_r)"
    flags = ("vera_r", "vera_d_initial", "vera_projection_seed")
    has_alpha = False

    def fill_settings(self, lora: LoraConfig, task_lora_r: int) -> None:
        for name in ("lora_r", "lora_alpha"):
            if getattr(lora, name) is not None:
                raise UsageError(
                    f"--{name} does not apply to --method vera (its rank is --vera_r; VeRA has no alpha "
                    "scaling)"
                )
        lora.vera_r = DEFAULT_VERA_R if lora.vera_r is None else lora.vera_r
        lora.vera_d_initial = DEFAULT_VERA_D_INITIAL if lora.vera_d_initial is None else lora.vera_d_initial
        lora.vera_projection_seed = lora.vera_projection_seed or 0
        if lora.vera_r <= 0:
            raise UsageError(f"--vera_r must be a positive integer, got {lora.vera_r}")
        if not (math.isfinite(lora.vera_d_initial) and lora.vera_d_initial > 0):
            raise UsageError(
                "--vera_d_initial must be > 0 (d = 0 would leave b without gradient), got "
                f"{lora.vera_d_initial}"
            )
        if lora.vera_projection_seed < 0:
            raise UsageError(f"--vera_projection_seed must be >= 0, got {lora.vera_projection_seed}")

    def adapter_settings(self, lora: LoraConfig) -> dict:
        return {
            "method": self.name,
            "r": lora.vera_r,
            "d_initial": lora.vera_d_initial,
            "projection_seed": lora.vera_projection_seed,
        }

    def attach(self, cfg: RunConfig, preparation: Preparation, output_dir: str):
        lora = cfg.lora
        return lambda layout: attach_vera_adapters(
            layout, lora.vera_r, lora.vera_d_initial, lora.vera_projection_seed, lora.lora_dropout
        )

    def rebuild(self, config: dict, need):
        projection = VeRAProjection(*need(f"{PROJECTION_NAME}.vera_A", f"{PROJECTION_NAME}.vera_B"))

        def rebuild_vera(name: str, wrapper):
            adapter = VeRAAdapter(wrapper.in_features, wrapper.out_features, projection, config["d_initial"])
            d, b = need(f"{name}.vera_lambda_d", f"{name}.vera_lambda_b")
            adapter.vera_lambda_d.data.copy_(d)
            adapter.vera_lambda_b.data.copy_(b)
            return adapter

        return rebuild_vera

    def peft_export(self, model, config: dict, modules: list[str]):
        from peft import VeraConfig

        state, adapters = {}, [model.get_submodule(name).adapter for name in modules]
        for name, adapter in zip(modules, adapters):
            for key in ("vera_lambda_b", "vera_lambda_d"):
                state[f"base_model.model.{name}.{key}"] = (
                    adapter.saved_tensors()[key].detach().clone().contiguous()
                )
        for key, value in adapters[0].shared_tensors().items():  # the one pair, kept once
            state[f"base_model.{key.rpartition('.')[2]}"] = value.detach().clone().contiguous()
        peft_config = VeraConfig(
            r=config["r"],
            target_modules=modules,
            projection_prng_key=config["projection_seed"],
            save_projection=True,
            vera_dropout=0.0,
            d_initial=config["d_initial"],
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=config["base_model"],
        )
        return state, peft_config


register(VeRA())
