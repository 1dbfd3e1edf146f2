"""The registered fine-tuning methods, one module each; importing this package registers them all.

A new method: a module here with a :class:`ds_loradrop.method.registry.Method` subclass ending with
``register(...)``, and one import line below.
"""

from ds_loradrop.method.kinds import full, lora, loradrop, sparse_lora, tied_lora, vera  # noqa: F401
