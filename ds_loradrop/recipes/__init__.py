"""The recipes the entry points run, on top of everything else: ``train`` (the LoRA-drop story, with
``setup`` checking and preparing a run), ``evaluate``, ``export``, ``importance``, and ``cli`` (flags into
configs, errors into exit statuses). Nothing imports a recipe except ``launch/`` and another recipe.
"""
