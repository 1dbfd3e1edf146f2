"""The method: LoRA layers and where adapters sit (``lora``), the importance ||B A x||^2
(``importance``) and the pass that measures it (``probe``), layer selection (``selection``), the plan
(``plan``), adapter files (``adapter_files``), and the paper's other baselines (``vera``, ``tied_lora``,
``sparse_lora`` with ``snip``).

May import ``errors``, ``config``, ``data``, ``training`` and ``models``; never ``eval``, ``tracking`` or
``recipes``.
"""
