"""One rank's memory while loading a model and while training LoRA on it, through the project's own code
(``models.loading.load_for_deepspeed``, ``training.engine.build_engine``). Launched by
``bench/memory_vs_plan.py`` on 1, 2 or 4 ranks; each rank writes ``<out>/rank<r>.json``.

    deepspeed --num_gpus 2 bench/memory_probe.py --model DIR --ds_config ds_configs/zero3_bf16.json \
        --out DIR [--steps 2 --seq_length 128]

Memory is the process's *anonymous* resident memory (``RssAnon`` in ``/proc/self/status``, sampled every
5 ms, peak kept): what the rank itself holds. Plain peak RSS (``ru_maxrss``) is recorded too, but it also
counts pages of the memory-mapped safetensors file, which every rank maps whole while loading and which
the page cache shares between ranks. On a GPU the probe reports ``torch.cuda.max_memory_allocated``.
Each figure is the peak minus the baseline measured after imports and process-group start-up.
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


def anonymous_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The highest anonymous RSS seen since the last :meth:`reset`, sampled by a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = anonymous_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous_rss())
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = anonymous_rss()

    def read(self) -> int:
        self.peak = max(self.peak, anonymous_rss())
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

    def measured() -> int:
        return int(torch.cuda.max_memory_allocated(device)) if on_gpu else sampler.read()

    sampler = PeakSampler()
    barrier()
    baseline = torch.cuda.memory_allocated(device) if on_gpu else anonymous_rss()
    sampler.reset()

    model, zero3_loading = load_for_deepspeed(args.model, ds_config)
    barrier()
    loading_peak = measured()
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
    if not on_gpu:
        sampler.stop()
    record = {
        "rank": rank,
        "world_size": world_size,
        "device": device.type,
        "kind": "cuda_max_memory_allocated" if on_gpu else "peak_anonymous_rss",
        "baseline_bytes": int(baseline),
        "loading_bytes": int(loading_peak - baseline),
        "training_bytes": int(training_peak - baseline),
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
