"""Batched generation over ranks: left padding, KV cache, inputs sorted by length, greedy or beams.

Examples are sorted by prompt length (longest first) and dealt to ranks round-robin; each rank
generates its share in batches; the predictions are gathered to every rank and put back in the
original order. With ``synced_gpus`` (ZeRO-3 with partitioned weights) every rank runs the same number
of ``generate`` calls, padding its share with a dummy batch whose output is discarded, and transformers
keeps the ranks stepping together until all are done.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ds_loradrop.data import chat
from ds_loradrop.data.batching import clip_prompt
from ds_loradrop.data.tasks import EvalExample
from ds_loradrop.training.distributed import all_gather_object, all_reduce_sum, get_world_size_and_rank


@dataclass
class GenerationResult:
    predictions: list[str]
    num_generated_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_token_budget(model_config, max_new_tokens: int, cap: int = 4096) -> int:
    """Prompt tokens kept for generation: the model's context (capped) minus the tokens to generate."""
    context = getattr(model_config, "max_position_embeddings", cap)
    return max(16, min(context, cap) - max_new_tokens)


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, over-long ones clipped as in training (:func:`data.clip_prompt`)."""
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    bos_token_id = getattr(tokenizer, "bos_token_id", None)
    return [clip_prompt(row, max_prompt_tokens, bos_token_id) for row in ids]


def encode_examples(tokenizer, examples: list[EvalExample], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each example's prompt; a chat example is its conversation rendered with the chat
    template (which writes its own special tokens), clipped the same way."""
    if not any(example.messages is not None for example in examples):
        return encode_prompts(tokenizer, [example.prompt for example in examples], max_prompt_tokens)
    chat.require_chat_template(tokenizer)
    bos_token_id = getattr(tokenizer, "bos_token_id", None)
    texts = [chat.render_generation_prompt(tokenizer, example.messages) for example in examples]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [clip_prompt(row, max_prompt_tokens, bos_token_id) for row in ids]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids (an instruct model may end its turn
    with a token other than the tokenizer's EOS, e.g. Gemma's <end_of_turn>, Llama-3's <|eot_id|>)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(getattr(model, "module", model), "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    for token_id in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest), padded on the left."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, length - len(row) :] = 1
    return input_ids, attention_mask


def rank_batches(lengths: list[int], rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's example indices in batches, longest prompts first; every rank gets the same number of
    batches (trailing ones may be empty)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    mine = order[rank::world_size]
    num_batches = math.ceil(math.ceil(len(lengths) / world_size) / batch_size) if lengths else 0
    return [mine[b * batch_size : (b + 1) * batch_size] for b in range(num_batches)]


@torch.no_grad()
def generate_predictions(
    model,
    tokenizer,
    examples: list[EvalExample],
    *,
    batch_size: int,
    max_new_tokens: int,
    num_beams: int,
    synced_gpus: bool,
    device: torch.device,
    max_prompt_tokens: int,
) -> GenerationResult:
    """Generate for every example on all ranks; every rank returns all predictions in input order."""
    world_size, rank = get_world_size_and_rank()
    prompt_ids = encode_examples(tokenizer, examples, max_prompt_tokens)
    pad_token_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    mine: list[tuple[int, str]] = []
    generated = 0
    start = time.perf_counter()
    batches = rank_batches([len(ids) for ids in prompt_ids], rank, world_size, batch_size)
    progress = tqdm(total=len(examples), desc="eval", disable=rank != 0, dynamic_ncols=True, mininterval=2.0)
    for indices in batches:
        if not indices and not synced_gpus:
            continue
        input_ids, attention_mask = left_pad([prompt_ids[i] for i in (indices or [0])], pad_token_id)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            eos_token_id=stop_token_ids(model, tokenizer),
            pad_token_id=pad_token_id,
            use_cache=True,
            synced_gpus=synced_gpus,
        )
        new_tokens = output[:, input_ids.shape[1] :].cpu()
        for index, tokens in zip(indices, new_tokens):
            kept = tokens[tokens != pad_token_id]
            generated += int(kept.numel())
            mine.append((index, tokenizer.decode(kept, skip_special_tokens=True).strip()))
        # rank 0 counts for everyone: its share is the largest
        progress.update(min(len(examples) - progress.n, len(indices) * world_size))
        progress.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.0f}")
    progress.close()
    seconds = time.perf_counter() - start
    model.train(was_training)
    by_index = dict(pair for share in all_gather_object(mine) for pair in share)
    total_generated = int(
        all_reduce_sum(torch.tensor([float(generated)], dtype=torch.float64, device=device))
    )
    return GenerationResult([by_index[i] for i in range(len(examples))], total_generated, seconds)
