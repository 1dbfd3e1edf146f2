"""``--method tied_lora``: Tied-LoRA (TL6, Renduchintala et al. 2024), one LoRA pair per target tied across
layers with trainable scaling vectors u and v per layer (the LoRA-drop paper's baseline at r = 56)."""

from __future__ import annotations

from ds_loradrop.config import LoraConfig, RunConfig
from ds_loradrop.config.method import DEFAULT_TIED_LORA_R
from ds_loradrop.errors import UsageError
from ds_loradrop.method.registry import Method, Preparation, register
from ds_loradrop.method.tied_lora import TiedLoRAAdapter, TiedPair, attach_tied_adapters, tied_pair_name


class TiedLoRA(Method):
    name = "tied_lora"
    summary = (
        "Tied-LoRA (TL6): one pair per target tied across layers, vectors u and v per layer (--tied_lora_r)"
    )
    flags = ("tied_lora_r",)
    peft_expressible = False  # PEFT has no Tied-LoRA

    def fill_settings(self, lora: LoraConfig, task_lora_r: int) -> None:
        if lora.lora_r is not None:
            raise UsageError("--lora_r does not apply to --method tied_lora (its rank is --tied_lora_r)")
        lora.tied_lora_r = DEFAULT_TIED_LORA_R if lora.tied_lora_r is None else lora.tied_lora_r
        if lora.tied_lora_r <= 0:
            raise UsageError(f"--tied_lora_r must be a positive integer, got {lora.tied_lora_r}")
        if lora.lora_alpha is None:
            lora.lora_alpha = 2.0 * lora.tied_lora_r

    def adapter_settings(self, lora: LoraConfig) -> dict:
        return {"method": self.name, "r": lora.tied_lora_r, "lora_alpha": lora.lora_alpha}

    def attach(self, cfg: RunConfig, preparation: Preparation, output_dir: str):
        lora = cfg.lora
        return lambda layout: attach_tied_adapters(
            layout, lora.tied_lora_r, lora.lora_alpha, lora.lora_dropout
        )

    def rebuild(self, config: dict, need):
        pairs: dict[str, TiedPair] = {}

        def rebuild_tied(name: str, wrapper):
            target = wrapper.target
            if target not in pairs:
                lora_A, lora_B = need(f"{tied_pair_name(target)}.lora_A", f"{tied_pair_name(target)}.lora_B")
                pairs[target] = TiedPair(wrapper.in_features, wrapper.out_features, config["r"])
                pairs[target].lora_A.data.copy_(lora_A)
                pairs[target].lora_B.data.copy_(lora_B)
            adapter = TiedLoRAAdapter(pairs[target], target, config["lora_alpha"])
            u, v = need(f"{name}.tied_u", f"{name}.tied_v")
            adapter.tied_u.data.copy_(u)
            adapter.tied_v.data.copy_(v)
            return adapter

        return rebuild_tied


register(TiedLoRA())
