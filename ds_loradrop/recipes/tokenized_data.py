"""Tokenised examples for a run, through the on-disk cache: rank 0 tokenises once (or finds them cached by
an earlier run) and tells the other ranks where they are; a rank that cannot see that directory (a
node-local cache on another node) tokenises for itself."""

from __future__ import annotations

from ds_loradrop.data.batching import tokenize_examples
from ds_loradrop.data.token_cache import cache_key, cache_path, load_cached, save_cached
from ds_loradrop.errors import UsageError
from ds_loradrop.training.distributed import broadcast_object, get_logger, is_rank_zero

logger = get_logger()


def tokenize_with_cache(
    examples, tokenizer, max_seq_length: int, *, cache_root: str | None, what: str
) -> tuple[list[dict], int]:
    """(examples with input_ids / labels / the examples' other columns, number truncated). Call on every
    rank; ``cache_root`` None tokenises without the cache."""
    if cache_root is None:
        tokenized, num_truncated = tokenize_examples(examples, tokenizer, max_seq_length)
        return tokenized.to_list(), num_truncated
    path, failure = None, None
    if is_rank_zero():
        try:
            path = cache_path(cache_root, cache_key(examples, tokenizer, max_seq_length))
            if load_cached(path) is not None:
                logger.info(
                    f"{what}: {len(examples)} examples' tokens loaded from the cache {path} (no tokenisation)"
                )
            else:
                tokenized, num_truncated = tokenize_examples(examples, tokenizer, max_seq_length)
                save_cached(path, tokenized, num_truncated)
                logger.info(f"{what}: {len(examples)} examples tokenised; cached in {path}")
        except Exception as error:
            # release the waiting ranks; a usage error (e.g. a chat template that cannot be trained turn
            # by turn) stays one on every rank, so the job exits 2 and is not retried
            broadcast_object((None, (isinstance(error, UsageError), f"{type(error).__name__}: {error}")))
            raise
    path, failure = broadcast_object((path, failure))
    if failure is not None:
        is_usage_error, message = failure
        if is_usage_error:
            raise UsageError(message.removeprefix("UsageError: "))
        raise RuntimeError(f"rank 0 could not tokenise the {what}: {message}")
    # None: not visible from this rank's node
    tokenized, num_truncated = load_cached(path) or tokenize_examples(examples, tokenizer, max_seq_length)
    return tokenized.to_list(), num_truncated
