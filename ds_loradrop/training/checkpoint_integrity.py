"""Is a checkpoint whole? A manifest of every file's size and SHA-256, written last before the checkpoint is
renamed into place, and checked before a resume; and the free space a save needs, checked before it starts.

A checkpoint can be damaged after it was completed: a node that died while a shared file system was
still flushing it, a truncated copy, a bit flip, a file deleted by hand. ``verify`` names the first
problem: the manifest missing, a file missing, a size or a checksum that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from ds_loradrop.errors import StorageFull
from ds_loradrop.training.distributed import all_reduce_max

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(directory: str) -> list[str]:
    """Every file under ``directory`` but the manifest, relative, sorted."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative != MANIFEST_NAME:
                found.append(relative)
    return sorted(found)


def write_manifest(directory: str) -> dict:
    """Record the size and SHA-256 of every file in ``directory`` (its last write)."""
    manifest = {
        "files": {
            name: {
                "bytes": os.path.getsize(os.path.join(directory, name)),
                "sha256": file_digest(os.path.join(directory, name)),
            }
            for name in checkpoint_files(directory)
        }
    }
    staging = os.path.join(directory, MANIFEST_NAME + ".tmp")
    with open(staging, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, os.path.join(directory, MANIFEST_NAME))
    return manifest


def verify(directory: str) -> str | None:
    """None if every file of the manifest is there with its size and checksum, else what is wrong."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return f"no {MANIFEST_NAME} (the save did not finish)"
    try:
        with open(path) as handle:
            files = json.load(handle)["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST_NAME} ({type(error).__name__})"
    for name, expected in sorted(files.items()):
        target = os.path.join(directory, name)
        if not os.path.isfile(target):
            return f"{name} is missing"
        size = os.path.getsize(target)
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, the manifest says {expected['bytes']}"
        if file_digest(target) != expected["sha256"]:
            return f"{name} does not match its SHA-256 checksum"
    return None


def size_on_disk(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in checkpoint_files(directory))


def missing_space(root: str, needed_bytes: int) -> int:
    """Bytes short on the file system of ``root`` (which may not exist yet) for ``needed_bytes``; 0 if
    they fit."""
    probe = root
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    return max(0, needed_bytes - free)


# Per trainable parameter: DeepSpeed's fp32 master and two Adam moments plus the module's copy (16 B) and
# the portable state's three fp32 tensors (12 B); a first save's estimate, later ones use the newest.
_BYTES_PER_TRAINABLE_PARAMETER = 28
_MARGIN_BYTES = 1 << 20


def check_space(engine, output_dir: str, name: str, newest: str | None) -> None:
    """Raise StorageFull on every rank, before anything of checkpoint ``name`` is written, when a rank's
    file system has less free space than the checkpoint needs (the newest one's size, else an estimate)."""
    if newest is not None:
        needed = size_on_disk(newest)
    else:
        trainable = sum(
            getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad
        )
        needed = trainable * _BYTES_PER_TRAINABLE_PARAMETER
    short = missing_space(output_dir, needed + _MARGIN_BYTES)
    worst = int(all_reduce_max(torch.tensor([short], dtype=torch.int64)).item())
    if worst > 0:
        kept = (
            f"the newest complete checkpoint {newest} is intact"
            if newest
            else "no checkpoint was written yet"
        )
        raise StorageFull(
            f"no space for checkpoint {name} in {output_dir!r}: it needs about {needed + _MARGIN_BYTES:,} "
            "bytes "
            f"and a rank's file system is {worst:,} bytes short; {kept}. Free space (or lower "
            "--save_total_limit) and resume with --resume auto"
        )
