"""Models: loading a causal LM by path or hub id (``loading``) and the built-in presets, built once on rank 0
into a content-addressed cache (``loading`` for ``tiny-llama``, ``smollm2`` for the pretrained SmolLM2-135M).

May import ``errors``, ``config``, ``data`` and ``training``.
"""
