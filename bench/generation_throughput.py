"""Generation throughput: our batched evaluation generation against a per-example ``generate`` loop
and transformers' text-generation ``pipeline``.

    python bench/generation_throughput.py                      # tiny-llama preset, 128 E2E validation inputs
    python bench/generation_throughput.py --model PATH --num_inputs 256 --batch_size 16 --json out.json

Measures generated tokens per second of two ways to generate for the same real E2E validation prompts
with the same model, in one run, one process (a plain Hugging Face model, no DeepSpeed engine):

- ``batched`` (ours): ``ds_loradrop.eval.generation.generate_predictions``, as the evaluation runs it:
  prompts sorted by length (longest first), left-padded batches of ``--batch_size``, KV cache, greedy;
- ``per_example`` (the peer): ``model.generate`` on one unpadded prompt at a time, with the same
  encoded (and clipped) prompts, greedy, the same ``max_new_tokens``, EOS and pad tokens, KV cache;
- ``pipeline`` (the second peer): ``pipeline("text-generation")`` over the prompt texts in batches of
  ``--batch_size`` (left padding), greedy, same limits (its tokens counted from its text).

Both count generated tokens the same way: the new tokens of each input that are not padding (EOS
included), and both time the ``generate`` calls and the decoding, after one untimed warm-up batch
each. Printed: a Markdown table (mode, inputs, generated tokens, seconds, tokens/s), the ratio
batched / per-example, and how many predictions differ between the two (left padding can change the
floating-point sums of attention, so greedy decoding may pick another token on a near tie: reported,
not hidden). The default tiny-llama preset is random, so it rarely emits EOS and both modes mostly
generate ``max_new_tokens`` per input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from ds_loradrop.config import TINY_LLAMA, EvalConfig
from ds_loradrop.data.tasks import EvalExample, get_task
from ds_loradrop.eval.generation import (
    GenerationResult,
    encode_prompts,
    generate_predictions,
    prompt_token_budget,
)
from ds_loradrop.models.loading import load_causal_lm, load_model_config, load_tokenizer, resolve_model_path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=TINY_LLAMA, help=f"{TINY_LLAMA!r} (the preset) or a checkpoint path"
    )
    parser.add_argument(
        "--model_cache_dir", default=None, help="cache of the tiny-llama preset (default: the usual)"
    )
    parser.add_argument("--data_dir", default=os.path.join(REPO_ROOT, "..", "shared", "data", "e2e"))
    parser.add_argument("--num_inputs", type=int, default=128, help="first N distinct validation inputs")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=EvalConfig.eval_batch_size,
        help="prompts per generate() call in the batched mode (default: the evaluation's)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the task's (64 for E2E)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("num_inputs", "batch_size", "max_new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be > 0, got {value}")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_one_by_one(
    model,
    tokenizer,
    examples: list[EvalExample],
    *,
    max_new_tokens: int,
    device: torch.device,
    max_prompt_tokens: int,
) -> GenerationResult:
    """The peer: ``model.generate`` per prompt (no padding), greedy, counted as generate_predictions
    counts."""
    prompt_ids = encode_prompts(tokenizer, [ex.prompt for ex in examples], max_prompt_tokens)
    pad_token_id = tokenizer.pad_token_id
    model.eval()
    predictions, generated = [], 0
    synchronize(device)
    start = time.perf_counter()
    for ids in prompt_ids:
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
        )
        tokens = output[0, input_ids.shape[1] :].cpu()
        kept = tokens[tokens != pad_token_id]
        generated += int(kept.numel())
        predictions.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    synchronize(device)
    return GenerationResult(predictions, generated, time.perf_counter() - start)


def generate_with_pipeline(
    model,
    tokenizer,
    examples: list[EvalExample],
    *,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    max_prompt_tokens: int,
) -> GenerationResult:
    """The second peer: transformers' ``pipeline("text-generation")`` over the prompt texts, batched
    (left padding), greedy, the same ``max_new_tokens`` and EOS. It returns text, so its generated tokens
    are counted by encoding each prediction again (plus its EOS when it stopped before the limit)."""
    from transformers import pipeline

    del max_prompt_tokens  # E2E prompts are far below the budget: the pipeline sees them whole
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=device)
    synchronize(device)
    start = time.perf_counter()
    outputs = generator(
        [ex.prompt for ex in examples],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        return_full_text=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    synchronize(device)
    seconds = time.perf_counter() - start
    predictions = [output[0]["generated_text"].strip() for output in outputs]
    generated = 0
    for prediction in predictions:
        n = len(tokenizer(prediction, add_special_tokens=False)["input_ids"])
        generated += n + 1 if n < max_new_tokens else n
    return GenerationResult(predictions, generated, seconds)


def main(args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task = get_task("e2e")
    examples = task.load_eval(args.data_dir, "validation", args.num_inputs)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    model_path = resolve_model_path(
        args.model, args.model_cache_dir, lambda rows: task.training_text(args.data_dir, rows, "train")
    )
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, DTYPES[args.dtype])
    device = torch.device(args.device)
    model.to(device).eval()
    max_prompt_tokens = prompt_token_budget(load_model_config(model_path), max_new_tokens)
    common = {"max_new_tokens": max_new_tokens, "device": device, "max_prompt_tokens": max_prompt_tokens}

    def batched(batch: list[EvalExample]) -> GenerationResult:
        result = generate_predictions(
            model, tokenizer, batch, batch_size=args.batch_size, num_beams=1, synced_gpus=False, **common
        )
        synchronize(device)
        return result

    # Untimed warm-up: one small batch in each mode.
    batched(examples[: min(len(examples), args.batch_size)])
    generate_one_by_one(model, tokenizer, examples[:1], **common)

    generate_with_pipeline(model, tokenizer, examples[: min(len(examples), 2)], batch_size=2, **common)

    runs = {
        "batched": batched(examples),
        "per_example": generate_one_by_one(model, tokenizer, examples, **common),
        "pipeline": generate_with_pipeline(model, tokenizer, examples, batch_size=args.batch_size, **common),
    }
    differing = [
        i
        for i, (a, b) in enumerate(zip(runs["batched"].predictions, runs["per_example"].predictions))
        if a != b
    ]
    differing_from_pipeline = [
        i for i, (a, b) in enumerate(zip(runs["batched"].predictions, runs["pipeline"].predictions)) if a != b
    ]
    prompt_lengths = [
        len(ids) for ids in encode_prompts(tokenizer, [ex.prompt for ex in examples], max_prompt_tokens)
    ]
    results = {
        "model": args.model if args.model != TINY_LLAMA else f"{TINY_LLAMA} ({model_path})",
        "dtype": args.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "num_inputs": len(examples),
        "batch_size": args.batch_size,
        "max_new_tokens": max_new_tokens,
        "prompt_tokens_min": min(prompt_lengths),
        "prompt_tokens_max": max(prompt_lengths),
        "prompt_tokens_mean": sum(prompt_lengths) / len(prompt_lengths),
    }
    for name, run in runs.items():
        results[name] = {
            "inputs": len(run.predictions),
            "generated_tokens": run.num_generated_tokens,
            "seconds": run.seconds,
            "tokens_per_second": run.tokens_per_second,
        }
    results["batched_over_per_example"] = (
        results["batched"]["tokens_per_second"] / results["per_example"]["tokens_per_second"]
    )
    results["batched_over_pipeline"] = (
        results["batched"]["tokens_per_second"] / results["pipeline"]["tokens_per_second"]
    )
    results["num_differing_from_pipeline"] = len(differing_from_pipeline)
    results["identical_predictions"] = not differing
    results["num_differing_predictions"] = len(differing)
    results["differing_indices"] = differing
    results["examples_of_differences"] = [
        {
            "index": i,
            "id": examples[i].id,
            "batched": runs["batched"].predictions[i],
            "per_example": runs["per_example"].predictions[i],
        }
        for i in differing[:3]
    ]
    return results


def report(results: dict) -> str:
    lines = [
        (
            f"model {results['model']}, {results['dtype']} on {results['device']} x "
            f"{results['threads']} thread(s); "
            f"{results['num_inputs']} E2E validation inputs "
            f"({results['prompt_tokens_min']}-{results['prompt_tokens_max']} "
            f"prompt tokens, mean {results['prompt_tokens_mean']:.1f}), greedy, max_new_tokens "
            f"{results['max_new_tokens']}, batch size {results['batch_size']}"
        ),
        "",
        "| mode | inputs | generated tokens | seconds | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("batched", "per_example", "pipeline"):
        r = results[name]
        lines.append(
            f"| {name} | {r['inputs']} | {r['generated_tokens']} | {r['seconds']:.2f} | "
            f"{r['tokens_per_second']:.0f} |"
        )
    lines += [
        "",
        f"batched / per_example (tokens/s): {results['batched_over_per_example']:.2f}x",
        (
            f"batched / pipeline (tokens/s): {results['batched_over_pipeline']:.2f}x "
            f"({results['num_differing_from_pipeline']} of {results['num_inputs']} predictions differ)"
        ),
        (
            f"identical predictions: {results['identical_predictions']} "
            f"({results['num_differing_predictions']} of {results['num_inputs']} differ)"
        ),
    ]
    for diff in results["examples_of_differences"]:
        lines.append(
            f"  input {diff['index']} ({diff['id']}): batched {diff['batched']!r} "
            f"vs per_example {diff['per_example']!r}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = parse_args()
    outcome = main(arguments)
    print(report(outcome), flush=True)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(outcome, handle, indent=2)
