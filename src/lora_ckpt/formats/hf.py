"""Hugging Face model folders: ``model.safetensors``, sharded ``model.safetensors.index.json``, ``pytorch_model.bin``.

Reading is :class:`~lora_ckpt.source.Source`'s (shard names contained, index checked against the shards);
this module writes folders and says which of a model folder's other files belong in a copy.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from lora_ckpt.io import write_checkpoint
from lora_ckpt.output import Output, PathLike
from lora_ckpt.source import Source, contained, read_json

__all__ = ["CONV1D_MODULES", "MODEL_EXTRAS", "module_types", "copy_model_extras", "load_model_weights", "save_model_folder", "weight_files",
           "write_model_folder"]

#: The files besides the weights that a model folder needs (configs, tokenizer): what a merged copy takes along.
MODEL_EXTRAS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "spiece.model", "sentencepiece*.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)


#: Model types whose projections transformers stores as ``Conv1D`` ((in, out) weights), and which ones they are.
CONV1D_MODULES = {
    "gpt2": re.compile(r"(^|\.)(attn\.c_attn|attn\.q_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"),
    "imagegpt": re.compile(r"(^|\.)(attn\.c_attn|attn\.q_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"),
}


def module_types(model_config: Mapping[str, object] | None, names: Iterable[str]) -> dict[str, bool] | None:
    """For a model whose ``config.json`` names a known ``model_type``: per module name, whether transformers stores
    its weight (in, out) (``Conv1D``); None where the type is not known. This is how PEFT itself decides, per layer."""
    if model_config is None or not isinstance(model_config.get("model_type"), str):
        return None
    conv1d = CONV1D_MODULES.get(str(model_config["model_type"]))
    if conv1d is None:
        return {name: False for name in names}  # transformers' other models keep nn.Linear
    return {name: conv1d.search(name) is not None for name in names}


def weight_files(path: PathLike) -> list[Path]:
    """The weight files of a model: the file itself, or a folder's single file or index shards (checked)."""
    with Source.open(path) as source:
        return list(source.files)


def load_model_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """Return the state dict of a model file or Hugging Face model folder (all shards)."""
    with Source.open(path) as source:
        return source.load().state_dict


def copy_model_extras(source: PathLike, folder: Path, *, dtype: torch.dtype | None = None) -> list[str]:
    """Copy a model folder's configs and tokenizer files (:data:`MODEL_EXTRAS`) into ``folder``; return the
    names of its other files, left out (optimizer states, logs …). With ``dtype`` (the weights were cast),
    ``config.json`` says so (``torch_dtype``, and ``dtype`` where the config has it)."""
    src = Path(source)
    left_out: list[str] = []
    for f in sorted(src.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        if not any(fnmatch.fnmatchcase(f.name, p) for p in MODEL_EXTRAS):
            if not _is_weights(f.name):
                left_out.append(f.name)
            continue
        path = contained(src, f.name, what="the model file")
        if f.name == "config.json" and dtype is not None:
            config = read_json(path, what="model config")
            name = str(dtype).removeprefix("torch.")
            config["torch_dtype"] = name
            if "dtype" in config:
                config["dtype"] = name
            (folder / f.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            continue
        shutil.copyfile(path, folder / f.name)
    return left_out


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".index.json"))


def save_model_folder(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    like: PathLike | None = None,
    files: Mapping[str, str] | None = None,
    overwrite: bool = False,
    inputs: Iterable[PathLike | None] = (),
) -> Path:
    """Write a Hugging Face model folder: ``model.safetensors``, the configs and tokenizer files of the folder
    ``like`` and the text ``files`` (name -> content, e.g. ``config.json``).

    The folder is assembled beside the target and moved into place (:class:`~lora_ckpt.output.Output`),
    so a failure leaves nothing; ``inputs`` are paths the folder may not overwrite or contain.
    """
    out = Output.prepare(path, overwrite=overwrite, folder=True, inputs=[like, *inputs])
    with out.writing() as tmp:
        write_model_folder(tmp, state_dict, like=like, files=files)
    return out.path


def write_model_folder(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    like: PathLike | None = None,
    files: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Fill the (staging) folder ``folder`` as :func:`save_model_folder` does; return the files of ``like`` left out."""
    left_out = copy_model_extras(like, folder, dtype=dtype) if like is not None and Path(like).is_dir() else []
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    write_checkpoint(folder / "model.safetensors", dict(state_dict))
    return left_out
