"""One contender of bench/compare_trainers.py: a trainer users would otherwise run, or ours, for a few
timed steps on a real model and real task rows, in its own process (its peak memory is its own).

    deepspeed --num_gpus 2 bench/trainer_peers.py --contender hf_trainer --model smollm2-135m --task e2e

Contenders (same model, rows, LoRA r = 8 / alpha 16 on q_proj and v_proj, fp32, AdamW, constant learning
rate, gradient clipping 1.0, global batch):

- ``peer_loop``: PEFT ``get_peft_model`` and a plain PyTorch loop (DDP on several ranks), random batches
  padded to their longest sequence (bench/train_throughput.py's peer);
- ``hf_trainer``: transformers ``Trainer`` + PEFT, ``train_sampling_strategy="group_by_length"``
  (transformers 5's name for ``group_by_length=True``), under the same DeepSpeed JSON;
- ``sft_trainer``: TRL ``SFTTrainer`` with padding-free batches (every micro-batch one flattened sequence,
  per-example position ids) and completion-only loss, under the same DeepSpeed JSON;
- ``ours``: ds-loradrop's ``train_stage`` on its DeepSpeed engine (same JSON), and in the same process
  ``ours_loradrop``: the same trainer after a LoRA-drop plan (T = 0.9) from the importance of ``ours``'
  adapters after the warm-up, and ``ours_padding_free``: ``ours`` with ``--padding_free`` (each
  micro-batch one sequence, LM head only at target positions); the three alternate in chunks of steps.

The rows are the task's first ``--steps`` global batches' worth of training rows: one epoch is
``--steps`` steps. Each contender trains ``--warmup_epochs`` epochs over them untimed, then one timed
epoch, so every contender times exactly the same rows, each once, in whatever order its sampler picks
(with only part of an epoch timed, length grouping would put different rows, of different lengths, in
each contender's timed steps: DialogSum's rows run from about 100 to 768 tokens). Useful tokens are
non-padding target tokens (the loss positions), real tokens the non-padding input tokens; both are the
same for every contender. The result (JSON) holds per contender: seconds, useful and real tokens, peak
RSS per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from contenders import OURS
from harness import StepClock, filled_ds_config, load_model, model_path

from ds_loradrop.data.batching import IGNORE_INDEX, tokenize_examples
from ds_loradrop.data.tasks import get_task
from ds_loradrop.models.loading import load_model_config, load_tokenizer
from ds_loradrop.training import engine as ds_engine
from ds_loradrop.training.distributed import all_gather_object, all_reduce_sum
from ds_loradrop.training.ds_config import load_ds_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = ("peer_loop", "hf_trainer", "sft_trainer", "ours")
TARGETS = ["q_proj", "v_proj"]
MAX_SEQ_LENGTH = {"e2e": 128, "dart": 128, "dialogsum": 768, "gsm8k": 512}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contender", required=True, choices=CONTENDERS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="e2e", choices=sorted(MAX_SEQ_LENGTH))
    parser.add_argument("--data_dir", default=None, help="default: ../shared/data/<task>")
    parser.add_argument("--ds_config", default=os.path.join(REPO_ROOT, "ds_configs", "zero2.json"))
    parser.add_argument("--global_batch_size", type=int, default=8)
    parser.add_argument("--warmup_epochs", type=int, default=1, help="untimed epochs over the rows")
    parser.add_argument("--steps", type=int, default=10, help="timed steps: one epoch over the rows")
    parser.add_argument("--chunk_steps", type=int, default=2, help="ours: alternation with ours_loradrop")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True, help="where rank 0 writes the result")
    parser.add_argument("--profile", action="store_true", help="ours: print the top operators")
    parser.add_argument(
        "--alone",
        default=None,
        choices=OURS,
        help="ours: train only this one of ours' contenders (its peak memory as a run of its own)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_epochs < 0:
        parser.error("--steps must be >= 1 and --warmup_epochs >= 0")
    args.warmup_steps = args.warmup_epochs * args.steps  # the untimed steps before the timed epoch
    return args


def task_rows(args, tokenizer) -> list[dict]:
    """The task's first ``--steps`` global batches' worth of training rows (one epoch), tokenised as the
    trainer tokenises them (prompt + target + EOS, labels -100 on the prompt; rows left without a target
    are dropped, and the next rows take their place)."""
    task = get_task(args.task)
    data_dir = args.data_dir or os.path.join(REPO_ROOT, "..", "shared", "data", args.task)
    wanted = args.steps * args.global_batch_size
    examples = task.load_train(data_dir, wanted + max(8, wanted // 10))
    tokenized, _ = tokenize_examples(examples, tokenizer, MAX_SEQ_LENGTH[args.task])
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized.to_list()][:wanted]
    if len(rows) < wanted:
        raise SystemExit(f"error: {args.task} has {len(rows)} usable training rows, --steps needs {wanted}")
    return rows


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )


def hf_trainer_arguments(args, ds_config: dict, world_size: int, output_dir: str, **extra):
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.global_batch_size // world_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.warmup_steps + args.steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        # Without train_batch_size: DeepSpeed derives it (micro x accumulation x ranks). On a CPU the
        # TrainingArguments check it against their world size before the process group exists (1).
        deepspeed={k: v for k, v in ds_config.items() if k != "train_batch_size"},
        dataloader_num_workers=0,
        bf16=False,  # fp32 like every contender (SFTConfig defaults to bf16)
        disable_tqdm=True,
        remove_unused_columns=False,
        # Without a GPU, accelerate counts the ranks only with use_cpu: otherwise it sees one process and
        # leaves the data unsharded, every rank training the same batches (found 2026-12-04).
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )


def clock_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end(state.global_step)

    return Clock()


def counting(trainer_class, clock: StepClock):
    """``trainer_class`` whose ``compute_loss`` also counts the step's useful and real tokens."""

    class Counting(trainer_class):
        def compute_loss(self, model, inputs, *rest, **kwargs):
            if "attention_mask" in inputs:
                real = int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened sequence, no padding
                real = int(inputs["input_ids"].numel())
            clock.count(self.state.global_step + 1, inputs["labels"], real)
            return super().compute_loss(model, inputs, *rest, **kwargs)

    return Counting


def run_hf_trainer(args, rows, ds_config, world_size, tmp) -> dict:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = load_model(args)
    model = get_peft_model(model, lora_config(args))
    clock = StepClock(args.warmup_steps)
    trainer = counting(Trainer, clock)(
        model=model,
        args=TrainingArguments(
            **hf_trainer_arguments(
                args, ds_config, world_size, tmp, train_sampling_strategy="group_by_length"
            )
        ),
        train_dataset=Dataset.from_list([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]),
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
        callbacks=[clock_callback(clock)],
    )
    trainer.train()
    return {"hf_trainer": clock}


def run_sft_trainer(args, rows, ds_config, world_size, tmp) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model(args)
    clock = StepClock(args.warmup_steps)
    dataset = Dataset.from_list(
        [
            {"input_ids": r["input_ids"], "completion_mask": [int(x != IGNORE_INDEX) for x in r["labels"]]}
            for r in rows
        ]
    )
    config = SFTConfig(
        **hf_trainer_arguments(args, ds_config, world_size, tmp),
        padding_free=True,
        completion_only_loss=True,
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": False},
    )
    trainer = counting(SFTTrainer, clock)(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(args),
        callbacks=[clock_callback(clock)],
    )
    trainer.accelerator.gather_for_metrics = gather_scalars_over_gloo
    trainer.train()
    return {"sft_trainer": clock}


def gather_scalars_over_gloo(tensor: torch.Tensor, *unused, **unused_kwargs) -> torch.Tensor:
    """SFTTrainer's metric gathers (0-dim tensors) with ``all_gather`` over a list, which gloo supports:
    accelerate's ``all_gather_into_tensor`` path fails on gloo ("invalid output tensor list"). One
    collective per gathered value, as before."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.reshape(-1)
    value = tensor.detach().reshape(-1)
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value)
    return torch.cat(parts)


def main(args) -> None:
    import tempfile

    if args.contender in ("peer_loop", "ours"):
        ds_engine.init_distributed()
    # The HF trainers set up the process group themselves (accelerate), and size the DeepSpeed batch from
    # the launcher's WORLD_SIZE: an earlier init_distributed would leave them believing in one process.
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    tokenizer = load_tokenizer(model_path(args.model))
    rows = task_rows(args, tokenizer)
    # Every contender gets the same JSON with its "auto" values filled the same way.
    hidden_size = load_model_config(model_path(args.model)).hidden_size
    ds_config = filled_ds_config(
        load_ds_config(args.ds_config), args.global_batch_size // world_size, world_size, hidden_size
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.contender == "hf_trainer":
            clocks = run_hf_trainer(args, rows, ds_config, world_size, tmp)
        elif args.contender == "sft_trainer":
            clocks = run_sft_trainer(args, rows, ds_config, world_size, tmp)
        else:
            from contenders import run_ours, run_peer_loop

            run = run_ours if args.contender == "ours" else run_peer_loop
            clocks = run(args, rows, ds_config, tokenizer.pad_token_id)
    import resource

    peak = all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"contender": args.contender, "world_size": world_size, "peak_rss_bytes_per_rank": peak}
    for name, clock in clocks.items():
        totals = all_reduce_sum(torch.tensor([float(clock.useful), float(clock.real)], dtype=torch.float64))
        result[name] = {
            "seconds": max(all_gather_object(clock.seconds)),
            "useful_tokens": int(totals[0]),
            "real_tokens": int(totals[1]),
        }
    if rank == 0:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    if args.contender not in ("peer_loop", "ours"):  # accelerate started this process group
        ds_engine.release_shm_allreduce_buffer()
    ds_engine.shutdown_distributed()


if __name__ == "__main__":
    main(parse_args())
