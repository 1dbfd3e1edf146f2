"""Configuration files: a YAML or JSON file sectioned like :class:`RunConfig` (``model:``, ``data:``,
``lora:``, ``drop:``, ``train:``, ``eval:``, ``tracking:``), read into flag defaults so that flags on the
command line override it (torchtune's and litgpt's ``--config FILE key=value`` habit).

A finished run's ``run_config.json`` is such a file (its ``resolved`` block, what the run derived, is
ignored), so a run is relaunched from one file. Unknown sections or keys and values of the wrong type are
one :class:`UsageError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Literal, Union

import yaml

from ds_loradrop.errors import UsageError

# Blocks a run writes into its run_config.json that are not settings.
IGNORED_BLOCKS = ("resolved",)

# Settings an earlier version kept in another section: (section then, key) -> section now. Config files
# and the run_config.json of runs written before the move read back through with_moved_keys.
MOVED_KEYS = {("drop", "method"): "finetuning"}


def with_moved_keys(values: dict, where: str = "the run configuration") -> dict:
    """A sectioned mapping with each moved key in its section of now; the key given in both places with
    different values is an error."""
    moved = {
        name: dict(settings) if isinstance(settings, dict) else settings for name, settings in values.items()
    }
    for (old_section, key), new_section in MOVED_KEYS.items():
        old, new = moved.get(old_section), moved.setdefault(new_section, {})
        if not (isinstance(old, dict) and key in old and isinstance(new, dict)):
            continue  # nothing to move, or a malformed section the reader names
        value = old.pop(key)
        if key in new and new[key] != value:
            raise UsageError(
                f"{where}: {old_section}.{key} ({value!r}, the old place) and {new_section}.{key} "
                f"({new[key]!r}) disagree; keep {new_section}.{key} only"
            )
        new[key] = value
    return moved


def read_config_file(path: str) -> dict:
    """The file's mapping (YAML for .yaml / .yml, JSON otherwise), without the ignored blocks."""
    if os.path.isdir(path):
        hint = os.path.join(path, "run_config.json")
        hint = f" (a finished run's configuration is {hint!r})" if os.path.isfile(hint) else ""
        raise UsageError(f"--config {path!r} is a directory; give a YAML or JSON file{hint}")
    if not os.path.isfile(path):
        raise UsageError(f"--config {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith((".yaml", ".yml")):
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else path
        raise UsageError(f"{where}: invalid YAML ({getattr(error, 'problem', error)})") from error
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of sections (model:, data:, train:, ...)")
    return {key: value for key, value in values.items() if key not in IGNORED_BLOCKS}


def flag_defaults(values: dict, sections: dict[str, type], path: str) -> dict[str, object]:
    """``{flag name: value}`` of a sectioned mapping, each value checked against its field's type."""
    values = with_moved_keys(values, path)
    defaults = {}
    for section, settings in values.items():
        if section not in sections:
            raise UsageError(f"{path}: unknown section {section!r}; expected one of {list(sections)}")
        if settings is None:
            continue
        if not isinstance(settings, dict):
            raise UsageError(f"{path}: section {section!r} must be a mapping of settings")
        section_cls = sections[section]
        hints = typing.get_type_hints(section_cls)
        names = [f.name for f in dataclasses.fields(section_cls)]
        for key, value in settings.items():
            if key not in names:
                raise UsageError(f"{path}: unknown key {section}.{key}; {section} has {names}")
            defaults[key] = checked_value(value, hints[key], f"{path}: {section}.{key}")
    return defaults


def checked_value(value, hint, where: str):
    """``value`` if it fits the type ``hint`` (int given for a float becomes a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        errors = []
        for option in options:
            try:
                return checked_value(value, option, where)
            except UsageError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value in args:
            return value
        raise UsageError(f"{where}: expected one of {list(args)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UsageError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UsageError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"{where}: no check for type {hint!r}")
