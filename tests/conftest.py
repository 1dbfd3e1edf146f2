"""Shared fixtures: paths, a tiny Llama with fixed non-trivial weights, the real data directory."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# No hub access here: fail fast on hub ids instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DeepSpeed JIT-builds CPU ops; keep the tests' builds apart from other environments' (see DEEPSPEED_NOTES).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO_ROOT, ".cache", "torch_extensions"))
sys.path.insert(0, REPO_ROOT)

SHARED_DATA = os.environ.get("DS_LORADROP_DATA_ROOT", os.path.join(REPO_ROOT, "..", "shared", "data"))


@pytest.fixture(scope="session")
def e2e_dir() -> str:
    path = os.path.join(SHARED_DATA, "e2e")
    if not os.path.isfile(os.path.join(path, "trainset.csv")):
        pytest.fail(f"the shared E2E data is missing at {path} (see ../shared/data/README.md)")
    return path


def tiny_llama_model(num_layers: int = 4, seed: int = 0):
    """A small Llama from a config with fixed random (non-trivial) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def randomize_adapters(model, seed: int = 1, scale: float = 0.1) -> None:
    """Non-zero B so adapters change the output (B is zero at init)."""
    from ds_loradrop.lora import unique_adapters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in unique_adapters(model):
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * scale)
