"""Hugging Face model folders: ``model.safetensors``, sharded ``model.safetensors.index.json``, ``pytorch_model.bin``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_ckpt.errors import CheckpointFileError
from lora_ckpt.io import PathLike, load_checkpoint, save_checkpoint

__all__ = ["copy_model_extras", "install_folder", "load_model_weights", "save_model_folder", "weight_files"]

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")


def weight_files(path: PathLike) -> list[Path]:
    """The weight files of a model: the file itself, or a folder's single file or index shards."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CheckpointFileError(f"{p}: no such file or folder")
    for index in _INDEXES:
        if (p / index).is_file():
            try:
                weight_map = json.loads((p / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointFileError(f"{p / index}: not a valid index ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise CheckpointFileError(f"{p / index}: names shard(s) {missing[:3]} that are not in {p}")
            return [p / s for s in shards]
    for name in _SINGLE:
        if (p / name).is_file():
            return [p / name]
    raise CheckpointFileError(f"{p}: no {', '.join(_SINGLE + _INDEXES)} in this folder")


def load_model_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """Return the state dict of a model file or Hugging Face model folder (all shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        out.update(load_checkpoint(f).state_dict)
    return out


def copy_model_extras(source: PathLike, folder: Path) -> None:
    """Copy a model folder's files other than its weights (``config.json``, tokenizer files …) into ``folder``."""
    skip = set(_INDEXES + _SINGLE) | {f.name for f in weight_files(source)}
    for f in Path(source).iterdir():
        if f.is_file() and f.name not in skip and not f.name.startswith("."):
            shutil.copy2(f, folder / f.name)


def install_folder(tmp: Path, target: Path) -> None:
    """Rename the finished folder ``tmp`` to ``target``, replacing an existing one only once ``tmp`` is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, target)


def save_model_folder(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    like: PathLike | None = None,
    files: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face model folder: ``model.safetensors``, the non-weight files of the folder ``like``
    and the text ``files`` (name -> content, e.g. ``config.json``).

    The folder is assembled beside the target and renamed into place, so a failure leaves nothing.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise CheckpointFileError(f"{target}: already exists; pass overwrite=True (CLI: --force) to replace it")
    if not target.parent.is_dir():
        raise CheckpointFileError(f"{target}: the folder {target.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if like is not None and Path(like).is_dir():
            copy_model_extras(like, tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        save_checkpoint(tmp / "model.safetensors", dict(state_dict))
        install_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
