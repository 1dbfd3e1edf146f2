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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port, stopped after the session."""
    import subprocess
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
               "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
