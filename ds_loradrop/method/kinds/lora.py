"""``--method lora``: plain LoRA on every layer of every target, no stage 1 (the paper's LoRA baseline)."""

from __future__ import annotations

from ds_loradrop.method.registry import Method, register


class LoRA(Method):
    name = "lora"
    summary = "plain LoRA on every layer (no stage 1)"
    lora_pairs = True


register(LoRA())
