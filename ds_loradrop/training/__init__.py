"""Training machinery that knows nothing of LoRA-drop: the DeepSpeed engine (``engine``, the only module that
imports deepspeed), ranks talking to each other (``distributed``), the DeepSpeed JSON (``ds_config``), the
optimisation loop of one stage (``loop``), checkpoints (``checkpoint``) and the memory plan of a 7B run
(``memory_plan``).

May import ``errors``, ``config`` and ``data``; never ``method``, ``eval``, ``tracking`` or ``recipes``.
"""
