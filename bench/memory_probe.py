"""One rank's memory while loading a model and while training LoRA on it, through the project's own code
(``models.loading.load_for_deepspeed``, ``training.engine.build_engine``). Launched by
``bench/memory_vs_plan.py`` on 1, 2 or 4 ranks; each rank writes ``<out>/rank<r>.json``.

    deepspeed --num_gpus 2 bench/memory_probe.py --model DIR --ds_config ds_configs/zero3_bf16.json \
        --out DIR [--steps 2 --seq_length 128]

Memory on the CPU: the process's resident set (``VmRSS`` in ``/proc/self/status``) and its anonymous part
(``RssAnon``), sampled every 5 ms, peaks kept, each minus its value after imports and process-group
start-up. The resident set is what the rank holds: what it allocated, and the pages of the checkpoint
file it maps (transformers maps safetensors files and, when the dtypes match and nothing partitions them,
uses the mapped pages as the weights: then they are file-backed, not anonymous). What the rank *holds*
is its anonymous peak plus the checkpoint pages still mapped at the end of the phase (weights used in
place); pages read only to be converted or partitioned are page cache, not held. On a GPU the probe
reports ``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def resident_memory() -> tuple[int, int]:
    """(VmRSS, RssAnon) of this process in bytes."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                values[name] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["RssAnon"]


def mapped_checkpoint_bytes() -> int:
    """File-backed resident pages of the memory-mapped ``*.safetensors`` files still mapped by this
    process: weights that transformers uses in place from the checkpoint (same dtype, not partitioned).
    Pages written since (copy-on-write: a broadcast into the weights) are anonymous, already counted."""
    total, is_checkpoint = 0, False
    with open("/proc/self/smaps") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0]:  # a mapping's header line
                is_checkpoint = fields[-1].endswith(".safetensors")
            elif is_checkpoint and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
            elif is_checkpoint and fields[0] == "Anonymous:":
                total -= int(fields[1]) * 1024
    return total


class PeakSampler:
    """The highest (VmRSS, RssAnon) seen since the last :meth:`reset`, sampled by a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = resident_memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        now = resident_memory()
        self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = resident_memory()

    def read(self) -> tuple[int, int]:
        self._sample()
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A checkpoint directory (safetensors).")
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--lora_targets", default="q_proj,v_proj")
    parser.add_argument("--local_rank", type=int, default=None, help="Set by the DeepSpeed launcher.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from transformers import AutoConfig

    from ds_loradrop.config import TrainConfig
    from ds_loradrop.method.lora import LoRAAdapter
    from ds_loradrop.method.placement import cast_adapters, freeze_all_but_adapters, inject_lora
    from ds_loradrop.models.loading import load_for_deepspeed
    from ds_loradrop.training import engine as ds_engine
    from ds_loradrop.training.distributed import barrier, get_world_size_and_rank
    from ds_loradrop.training.ds_config import load_ds_config, resolve_ds_config

    args = parse_args(argv)
    ds_engine.init_distributed()
    world_size, rank = get_world_size_and_rank()
    device = ds_engine.local_device()
    on_gpu = device.type == "cuda"
    config = AutoConfig.from_pretrained(args.model)
    ds_config, _ = resolve_ds_config(
        load_ds_config(args.ds_config),
        TrainConfig(per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=1),
        world_size=world_size,
        hidden_size=config.hidden_size,
        accelerator_has_native_bf16=ds_engine.accelerator_has_native_bf16(),
    )

    def measured() -> tuple[int, int]:
        if on_gpu:
            allocated = int(torch.cuda.max_memory_allocated(device))
            return allocated, allocated
        return sampler.read()

    sampler = PeakSampler()
    barrier()
    baseline = (torch.cuda.memory_allocated(device),) * 2 if on_gpu else resident_memory()
    sampler.reset()

    model, zero3_loading = load_for_deepspeed(args.model, ds_config)
    barrier()
    loading_peak = measured()
    loading_mapped = 0 if on_gpu else mapped_checkpoint_bytes()
    held = ds_engine.describe_partitioning(model)

    torch.manual_seed(0)
    layout = inject_lora(model, args.lora_targets.split(","))
    for wrappers in layout.values():
        for wrapper in wrappers:
            wrapper.adapter = LoRAAdapter(wrapper.in_features, wrapper.out_features, r=8, alpha=16)
    freeze_all_but_adapters(model)
    cast_adapters(model, ds_engine.model_dtype(ds_config))
    model.config.use_cache = False
    engine = ds_engine.build_engine(
        model,
        ds_config,
        learning_rate=1e-4,
        weight_decay=0.0,
        lr_scheduler="constant",
        num_warmup_steps=0,
        num_training_steps=args.steps,
    )
    generator = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        ids = torch.randint(
            4, config.vocab_size, (args.micro_batch_size, args.seq_length), generator=generator
        )
        ids = ids.to(device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    barrier()
    training_peak = measured()
    training_mapped = 0 if on_gpu else mapped_checkpoint_bytes()
    sampler.stop()
    record = {
        "rank": rank,
        "world_size": world_size,
        "device": device.type,
        "kind": "cuda_max_memory_allocated" if on_gpu else "peak_resident_set",
        "baseline_bytes": int(baseline[0]),
        "loading_bytes": int(loading_peak[0] - baseline[0]),
        "training_bytes": int(training_peak[0] - baseline[0]),
        "loading_anonymous_bytes": int(loading_peak[1] - baseline[1]),
        "training_anonymous_bytes": int(training_peak[1] - baseline[1]),
        # held = allocated (anonymous) + the checkpoint pages still mapped as weights
        "loading_held_bytes": int(loading_peak[1] - baseline[1] + loading_mapped),
        "training_held_bytes": int(training_peak[1] - baseline[1] + training_mapped),
        "loading_mapped_checkpoint_bytes": loading_mapped,
        "training_mapped_checkpoint_bytes": training_mapped,
        "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "local_elements": held.local_elements,
        "elements": held.elements,
        "precision": ds_engine.describe_precision(engine),
        "loss": loss.item(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle, indent=2)
    del zero3_loading
    ds_engine.destroy_engine(engine)
    barrier()
    ds_engine.shutdown_distributed()


if __name__ == "__main__":
    main()
