"""Tracking: MLflow from the global rank 0 only (``mlflow_tracker``), what a run logs in LoRA-drop terms
(``experiment_log``), the plots (``plots``) and the comparison of an experiment's runs (``compare``).

May import every layer below it (``errors``, ``config``, ``data``, ``training``, ``models``, ``method``,
``eval``); never ``recipes``.
"""
