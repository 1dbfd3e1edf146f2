"""Data: the four tasks read from their published files (``tasks/``), stratified sampling, tokenisation with
target-only labels, and the batching every stage uses (``batching``).

The bottom layer with ``errors``: imports nothing else of ds_loradrop.
"""
