"""Evaluation by generation: batched generation (``generation``), generating and scoring a split
(``evaluation``), and the metrics (``metrics``: BLEU, ROUGE-L, GSM8K accuracy).

May import ``errors``, ``config``, ``data``, ``training``, ``models`` and ``method``.
"""
