"""Per-GPU and per-node CPU memory of a LoRA-drop run under ZeRO-2 / ZeRO-3, with and without offload.

Sizes (``N`` ranks, ``d`` bytes of the training dtype, 2 for bf16; steady state of one training step,
without DeepSpeed's communication buckets, the CUDA context, fragmentation or load-time peaks):

* Frozen base, ``B`` parameters: ``d * B`` bytes, replicated under ZeRO-2, ``/ N`` under ZeRO-3.
* Trainable LoRA-drop parameters ``T = round(retained_fraction * full_lora)``, where ``full_lora`` sums
  ``r * (in + out)`` over every ``nn.Linear`` whose name ends in a target. Each costs ``d`` (weight) +
  ``d`` (gradient) + ``4`` (fp32 master, only if ``d < 4``) + ``4 + 4`` (Adam m, v) = 16 bytes for bf16.
  Weights are replicated under ZeRO-2 and partitioned under ZeRO-3; gradients and optimizer state are
  partitioned (``/ N``) under both.
* ZeRO-3 also holds the parameters it has gathered for forward and backward: up to
  ``stage3_max_live_parameters`` of them (DeepSpeed's default 1e9; a module's full weights are released only
  when they will not be used again within ``stage3_max_reuse_distance``, also 1e9), and at least the largest
  module: ``d * max(largest_module_params, min(max_live_parameters, B))``. Measured (bench/memory_vs_plan.py):
  a 1.04B-parameter model on 2 ranks held every parameter gathered while training under the defaults;
  DeepSpeed's own estimator counts only the largest module. On one rank a partition is the whole
  parameter and nothing extra is gathered.
* ``offload_optimizer`` moves each rank's gradient + optimizer partition, ``(d + 8 [+4]) * T / N``, to
  CPU; ``offload_param`` (ZeRO-3) also moves the base and adapter weight partitions, ``d * (B + T) / N``.
  CPU per node = ranks per node x the per-rank share.

Activations per GPU for one micro-batch (``b`` sequences of ``s`` tokens, hidden ``h``, MLP width ``I``,
``a`` heads, ``L`` layers, vocabulary ``V``): the Korthikanti et al. 2022 per-layer count of saved tensors,
adapted to a Llama decoder layer (RMSNorm, RoPE, SwiGLU, no dropout), in elements per token:

* attention: q/k/v input ``h``, q after RoPE ``h``, k and v ``2 h_kv`` (``h_kv = kv_heads * head_dim``,
  smaller than ``h`` with grouped-query attention: Llama-2-70b, Llama-3, SmolLM2), o_proj input ``h``;
* SwiGLU MLP: gate/up input ``h``, gate output ``I``, SiLU(gate) ``I``, up output ``I``, down_proj
  input ``I``;
* two RMSNorms keep their fp32 input: ``2 * 4h`` bytes;
* eager attention also keeps the softmax probabilities, fp32 plus a ``d``-byte copy: ``(4 + d) * a * s``
  bytes (SDPA / flash attention keep no ``s x s`` matrix).

``layer = b * s * (d * (4h + 2h_kv + 4I) + 8h [+ (4 + d) * a * s])`` bytes; the loss keeps fp32 logits,
``4 * b * s * V``. Without checkpointing: ``L * layer + logits``. With activation checkpointing of every
decoder layer: the layer inputs ``L * b * s * h * d``, one layer recomputed in full, and the logits.
The count keeps every linear input (as full fine-tuning does); PyTorch may skip inputs of frozen,
un-adapted projections, so for LoRA-drop it is an upper bound.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ds_loradrop.errors import UsageError

GIB = 2**30
# DeepSpeed's default stage3_max_live_parameters (and stage3_max_reuse_distance).
DEEPSPEED_MAX_LIVE_PARAMETERS = 10**9
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# meta-llama/Llama-2-7b-hf config.json, so that the preset needs no download.
LLAMA_2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
# Grouped-query attention (8 key/value heads): meta-llama/Meta-Llama-3-8B and Llama-2-70b-hf config.json.
LLAMA_3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
}
LLAMA_2_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
PRESETS = {
    "llama-2-7b": LLAMA_2_7B,
    "meta-llama/llama-2-7b-hf": LLAMA_2_7B,
    "llama-3-8b": LLAMA_3_8B,
    "meta-llama/meta-llama-3-8b": LLAMA_3_8B,
    "llama-2-70b": LLAMA_2_70B,
    "meta-llama/llama-2-70b-hf": LLAMA_2_70B,
}


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs from a model: exact parameter counts and the decoder's widths."""

    total_params: int
    largest_module_params: int  # own (non-recursive) parameters of the largest module, as DeepSpeed counts
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    kv_width: int  # key/value projection width, num_key_value_heads * head_dim (< hidden_size with GQA)
    linear_layers: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features)


@dataclass(frozen=True)
class TrainingSetup:
    """LoRA-drop and batch settings; invalid values raise UsageError."""

    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    retained_fraction: float = 0.5
    micro_batch_size: int = 4
    seq_length: int = 512
    dtype: str = "bf16"
    attention: str = "sdpa"
    max_live_parameters: int = DEEPSPEED_MAX_LIVE_PARAMETERS  # the ds_config's stage3_max_live_parameters

    def __post_init__(self):
        for name in ("lora_r", "micro_batch_size", "seq_length"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 < self.retained_fraction <= 1:
            raise UsageError(f"--retained_fraction must be in (0, 1], got {self.retained_fraction}")
        if not self.lora_targets:
            raise UsageError("--lora_targets names no projection")
        if self.dtype not in DTYPE_BYTES:
            raise UsageError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.max_live_parameters < 0:
            raise UsageError(f"--max_live_parameters must be >= 0, got {self.max_live_parameters}")
        if self.attention not in ("sdpa", "eager"):
            raise UsageError(f"--attention must be sdpa or eager, got {self.attention!r}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class MemoryEstimate:
    """One configuration on one GPU count; all sizes in bytes."""

    setup: str
    gpus: int
    gpu_model_states: int
    gpu_activations: int
    gpu_activations_checkpointed: int
    cpu_per_node: int

    def as_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["gpu_total"] = self.gpu_model_states + self.gpu_activations
        row["gpu_total_checkpointed"] = self.gpu_model_states + self.gpu_activations_checkpointed
        return row


def load_model_shape(model: str) -> ModelShape:
    """Shape of a preset name, a model directory with config.json, or a config.json file (no download)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if model.lower() in PRESETS:
        config = LlamaConfig(**PRESETS[model.lower()])
    else:
        if not os.path.exists(model):
            raise UsageError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a path")
        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError, KeyError) as error:
            raise UsageError(f"cannot read a model config from {model!r}: {error}".splitlines()[0]) from None
    try:
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config)
        text = config.get_text_config()
        mlp_width = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        shape_numbers = [
            text.hidden_size,
            mlp_width,
            text.num_hidden_layers,
            text.num_attention_heads,
            text.vocab_size,
            kv_heads * head_dim,
        ]
    except (AttributeError, ValueError, KeyError) as error:
        raise UsageError(f"cannot build a causal LM from the config of {model!r}: {error}") from None
    own_sizes = [sum(p.numel() for p in module.parameters(recurse=False)) for module in built.modules()]
    linear_layers = tuple(
        (name, module.in_features, module.out_features)
        for name, module in built.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    total = sum(p.numel() for p in built.parameters())  # parameters() yields a tied weight once
    return ModelShape(total, max(own_sizes), *shape_numbers, linear_layers)


def full_lora_parameters(shape: ModelShape, targets: tuple[str, ...], r: int) -> int:
    """``r * (in + out)`` summed over the nn.Linear modules whose name ends in a target."""
    counts = {t: [i + o for name, i, o in shape.linear_layers if name.split(".")[-1] == t] for t in targets}
    missing = [t for t, widths in counts.items() if not widths]
    if missing:
        raise UsageError(f"LoRA target(s) {missing} match no nn.Linear of the model")
    return r * sum(sum(widths) for widths in counts.values())


def trainable_parameters(shape: ModelShape, setup: TrainingSetup) -> int:
    """LoRA-drop's trainable parameters: the retained fraction of the full LoRA count."""
    return round(setup.retained_fraction * full_lora_parameters(shape, setup.lora_targets, setup.lora_r))


def activation_bytes(shape: ModelShape, setup: TrainingSetup, checkpointing: bool) -> int:
    """Activations kept for backward on one GPU for one micro-batch (formula in the module docstring)."""
    d, h, tokens = setup.dtype_bytes, shape.hidden_size, setup.micro_batch_size * setup.seq_length
    per_token = d * (4 * h + 2 * shape.kv_width + 4 * shape.intermediate_size) + 8 * h
    if setup.attention == "eager":
        per_token += (4 + d) * shape.num_heads * setup.seq_length
    layer, logits = tokens * per_token, 4 * tokens * shape.vocab_size
    if checkpointing:
        return shape.num_layers * tokens * h * d + layer + logits
    return shape.num_layers * layer + logits


def lora_drop_model_states(
    shape: ModelShape,
    setup: TrainingSetup,
    stage: int,
    gpus: int,
    offload_optimizer: bool,
    offload_param: bool,
) -> tuple[int, int]:
    """(GPU bytes, CPU bytes) of one rank's weights, gradients and optimizer state."""
    d, trainable = setup.dtype_bytes, trainable_parameters(shape, setup)
    grads_and_optimizer = (d + 8 + (4 if d < 4 else 0)) * trainable / gpus  # grad, [fp32 master,] Adam m, v
    weights = d * (shape.total_params + trainable) / (gpus if stage == 3 else 1)
    # one rank: a partition is the whole parameter, used in place (measured: no gathered copy)
    gathered = d * gathered_parameters(shape, setup) if stage == 3 and gpus > 1 else 0
    on_cpu = grads_and_optimizer * offload_optimizer + weights * offload_param
    return round(weights + gathered + grads_and_optimizer - on_cpu), round(on_cpu)


def gathered_parameters(shape: ModelShape, setup: TrainingSetup) -> int:
    """Parameters ZeRO-3 keeps gathered on a rank while training (module docstring)."""
    return max(shape.largest_module_params, min(setup.max_live_parameters, shape.total_params))


def loading_bytes(shape: ModelShape, setup: TrainingSetup, stage: int, gpus: int) -> int:
    """What one rank holds when ``from_pretrained`` returns: the base weights in the training dtype, whole
    under ZeRO-2, its ``1 / N`` partition under ZeRO-3 (loaded straight into partitions, one module
    gathered at a time: ``d * largest_module_params``)."""
    d = setup.dtype_bytes
    if stage == 3:
        return round(d * shape.total_params / gpus + d * shape.largest_module_params)
    return d * shape.total_params


LORA_DROP_SETUPS = (  # (label, ZeRO stage, offload_optimizer, offload_param)
    ("LoRA-drop ZeRO-2", 2, False, False),
    ("LoRA-drop ZeRO-2 + offload_optimizer", 2, True, False),
    ("LoRA-drop ZeRO-3", 3, False, False),
    ("LoRA-drop ZeRO-3 + offload_optimizer", 3, True, False),
    ("LoRA-drop ZeRO-3 + offload_optimizer + offload_param", 3, True, True),
)


def node_layout(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(GPUs per node, nodes) for ``gpus`` ranks; a multi-node run must fill its nodes."""
    if gpus <= 0 or gpus_per_node <= 0:
        raise UsageError(f"GPU counts must be positive, got gpus={gpus}, gpus_per_node={gpus_per_node}")
    per_node = min(gpus, gpus_per_node)
    if gpus % per_node:
        raise UsageError(f"{gpus} GPUs do not fill nodes of {gpus_per_node} GPUs")
    return per_node, gpus // per_node


def plan_lora_drop(
    shape: ModelShape, setup: TrainingSetup, gpus: int, gpus_per_node: int
) -> list[MemoryEstimate]:
    """One estimate per LoRA-drop ZeRO setup on ``gpus`` GPUs."""
    per_node, _nodes = node_layout(gpus, gpus_per_node)
    activations = activation_bytes(shape, setup, False), activation_bytes(shape, setup, True)
    estimates = []
    for label, stage, offload_optimizer, offload_param in LORA_DROP_SETUPS:
        gpu, cpu = lora_drop_model_states(shape, setup, stage, gpus, offload_optimizer, offload_param)
        estimates.append(MemoryEstimate(label, gpus, gpu, *activations, cpu * per_node))
    return estimates


def markdown_table(estimates: list[MemoryEstimate]) -> str:
    """The estimates as a Markdown table in GiB (2**30 bytes, what DeepSpeed's estimator prints as GB)."""
    header = (
        "| setup | GPUs | model states / GPU (GiB) | activations / GPU, no ckpt / ckpt (GiB) "
        "| total / GPU, no ckpt / ckpt (GiB) | CPU / node (GiB) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for row in (e.as_dict() for e in estimates):
        gib = {key: f"{value / GIB:.2f}" for key, value in row.items() if isinstance(value, int)}
        lines.append(
            f"| {row['setup']} | {row['gpus']} | {gib['gpu_model_states']} | {gib['gpu_activations']} / "
            f"{gib['gpu_activations_checkpointed']} | {gib['gpu_total']} / {gib['gpu_total_checkpointed']} "
            f"| {gib['cpu_per_node']} |"
        )
    return "\n".join(lines)
