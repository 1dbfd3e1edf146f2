"""Data: the four tasks read from their published files (``tasks/``), stratified sampling, tokenisation with
target-only labels, and the batching every stage uses (``batching``).

Words used the same way everywhere: a *record* is one entry of a published file (an E2E meaning
representation with its references, a DialogSum dialogue); a *training example* is one
``{prompt, target, stratum}`` a record yields per reference (tokenised: ``input_ids`` / ``labels``); an
*evaluation example* is one distinct input with all its references; a *row* is a row of a batch tensor
(or of a table or CSV file), never a training example.

The bottom layer with ``errors``: imports nothing else of ds_loradrop.
"""
