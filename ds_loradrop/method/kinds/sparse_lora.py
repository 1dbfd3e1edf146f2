"""``--method sparse_lora``: the Sparse Adapter baseline (He et al. 2022): LoRA whose entries are pruned once,
before training, by SNIP saliency |w * dL/dw| on a seeded sample of training examples, the best
``1 - sparsity`` of them kept over all adapters (the LoRA-drop paper's baseline at sparsity 0.5)."""

from __future__ import annotations

import os
import time

import torch

from ds_loradrop.config import LoraConfig, RunConfig
from ds_loradrop.config.method import DEFAULT_SNIP_EXAMPLES, DEFAULT_SPARSITY
from ds_loradrop.errors import UsageError
from ds_loradrop.method.kinds.lora import LoRA
from ds_loradrop.method.registry import Preparation, StageTools, lora_rebuilder, register
from ds_loradrop.method.snip import measure_saliency, scoring_indices
from ds_loradrop.method.sparse_lora import (
    SparseLoRAAdapter,
    apply_masks,
    attach_sparse_adapters,
    global_keep_masks,
    load_masks,
    masks_digest,
    save_masks,
    sparse_adapters,
)
from ds_loradrop.run_files import MASKS_NAME
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import (
    barrier,
    broadcast_object,
    confirm_same_everywhere,
    get_logger,
    is_rank_zero,
)
from ds_loradrop.training.loop import StageResult

logger = get_logger()


class SparseLoRA(LoRA):
    name = "sparse_lora"
    summary = "Sparse Adapter: LoRA pruned once by SNIP before training (--sparsity)"
    flags = ("sparsity", "snip_examples")

    def fill_settings(self, lora: LoraConfig, task_lora_r: int) -> None:
        super().fill_settings(lora, task_lora_r)
        lora.sparsity = DEFAULT_SPARSITY if lora.sparsity is None else lora.sparsity
        lora.snip_examples = DEFAULT_SNIP_EXAMPLES if lora.snip_examples is None else lora.snip_examples
        if not 0.0 <= lora.sparsity < 1.0:
            raise UsageError(
                f"--sparsity must be in [0, 1) (the share of LoRA's entries pruned), got {lora.sparsity}"
            )
        if lora.snip_examples <= 0:
            raise UsageError(f"--snip_examples must be > 0, got {lora.snip_examples}")

    def adapter_settings(self, lora: LoraConfig) -> dict:
        return {**super().adapter_settings(lora), "sparsity": lora.sparsity}

    def finished_preparation(self, output_dir: str) -> str | None:
        masks = os.path.join(output_dir, MASKS_NAME)
        return masks if os.path.isfile(masks) else None

    def prepare(self, ctx, tools: StageTools) -> Preparation:
        if ctx.resume.finished_preparation is not None:
            masks = load_masks(ctx.resume.finished_preparation)  # the SNIP pass is never rerun
            confirm_same_everywhere("sparsity masks", masks_digest(masks))
            logger.info(f"SNIP finished before: using its masks ({ctx.resume.finished_preparation})")
            return Preparation(masks=masks)
        masks, pruning = run_pruning(ctx, tools)
        return Preparation(masks=masks, stages=[pruning])

    def attach(self, cfg: RunConfig, preparation: Preparation, output_dir: str):
        lora = cfg.lora

        def attach_pruned(layout) -> None:
            attach_sparse_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout)
            apply_masks(layout, preparation.masks)

        return attach_pruned

    def rebuild(self, config: dict, need):
        return lora_rebuilder(SparseLoRAAdapter, ("lora_A", "lora_B", "mask_A", "mask_B"), config, need)


def run_pruning(ctx, tools: StageTools) -> tuple[dict[str, torch.Tensor], StageResult]:
    """Score LoRA's entries with SNIP on a seeded sample, keep the best ``1 - sparsity`` of them (rank 0
    ranks, every rank checks it holds the same masks), save the masks."""
    cfg, lora, start = ctx.cfg, ctx.cfg.lora, time.perf_counter()
    indices = scoring_indices(len(ctx.train_examples), lora.snip_examples, cfg.train.seed)
    # The same seed as the final model's adapters: training starts from the A that was scored.
    built = tools.build_model(
        ctx,
        lambda layout: attach_sparse_adapters(layout, lora.lora_r, lora.lora_alpha, lora.lora_dropout),
        cfg.train.seed + 1,
    )
    engine = ds_engine.build_inference_engine(built.model, ctx.ds_config)
    scores = measure_saliency(
        ds_engine.module_for_gradients_of_non_parameters(engine),
        sparse_adapters(built.layout),
        [ctx.train_examples[i] for i in indices],
        batch_size=ctx.batch.micro_batch_size,
        pad_token_id=ctx.tokenizer.pad_token_id,
        device=ctx.device,
    )
    ds_engine.destroy_engine(engine)
    masks = broadcast_object(global_keep_masks(scores, lora.sparsity) if is_rank_zero() else None)
    confirm_same_everywhere("sparsity masks", masks_digest(masks))
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    logger.info(
        f"SNIP: scored on {len(indices)} examples; kept {kept}/{total} LoRA entries "
        f"({100 * kept / total:.1f}%) in {time.perf_counter() - start:.1f}s"
    )
    if is_rank_zero():
        save_masks(masks, os.path.join(ctx.output_dir, MASKS_NAME))
    barrier()
    return masks, StageResult("snip", seconds=time.perf_counter() - start)


register(SparseLoRA())
