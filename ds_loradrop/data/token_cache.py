"""Tokenised examples cached on disk with ``datasets`` (``save_to_disk`` / ``load_from_disk``), keyed by what
decides them: the examples' content (so the task, its files, the sampling and held-out settings), the
tokenizer (datasets' own ``Hasher``, as its ``map`` cache does), the sequence length, and the version of
the tokenisation code. A directory is complete once renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import datasets
from datasets.fingerprint import Hasher

# Bump when batching.tokenize_examples changes what it produces for the same inputs.
TOKENIZATION_VERSION = 2
CACHE_SUBDIR = "tokenized"
INFO_NAME = "ds_loradrop_tokenized.json"


def cache_key(examples: datasets.Dataset, tokenizer, max_seq_length: int) -> str:
    return Hasher.hash(
        {
            "version": TOKENIZATION_VERSION,
            # the examples themselves (the key's name kept: a new one would miss every existing cache);
            # a filter or select keeps the whole table plus an index mapping
            "rows": Hasher.hash(examples.flatten_indices(keep_in_memory=True).data.table),
            "tokenizer": Hasher.hash(tokenizer),
            "max_seq_length": max_seq_length,
        }
    )


def cache_path(cache_root: str, key: str) -> str:
    return os.path.join(cache_root, CACHE_SUBDIR, key)


def load_cached(path: str) -> tuple[datasets.Dataset, int] | None:
    """(examples, number truncated) from a complete cache directory, or None."""
    info = os.path.join(path, INFO_NAME)
    if not os.path.isfile(info):
        return None
    with open(info) as handle:
        num_truncated = json.load(handle)["num_truncated"]
    return datasets.load_from_disk(path, keep_in_memory=True), num_truncated


def save_cached(path: str, examples: datasets.Dataset, num_truncated: int) -> None:
    """Write into a temporary sibling directory, then rename it into place (another writer of the same
    key may have won the race: its copy is kept)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(path))
    try:
        examples.save_to_disk(staging)
        with open(os.path.join(staging, INFO_NAME), "w") as handle:
            json.dump({"num_truncated": num_truncated, "num_rows": len(examples)}, handle)
        try:
            os.rename(staging, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, INFO_NAME)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
