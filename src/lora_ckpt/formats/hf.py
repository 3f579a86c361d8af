"""Hugging Face model folders: ``model.safetensors``, sharded ``model.safetensors.index.json``, ``pytorch_model.bin``.

Reading is :class:`~lora_ckpt.source.Source`'s (shard names contained, index checked against the shards);
this module writes folders and says which of a model folder's other files belong in a copy.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_ckpt.io import write_checkpoint
from lora_ckpt.output import Output, PathLike
from lora_ckpt.source import Source, contained, read_json

if TYPE_CHECKING:
    from lora_ckpt.lowrank import Kind

__all__ = ["CONV1D_MODULES", "MODEL_EXTRAS", "module_types", "copy_model_extras", "load_model_weights", "meta_model_facts",
           "save_model_folder", "tied_weights", "warnings_quiet", "weight_files", "write_model_folder"]

log = logging.getLogger(__name__)

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


def meta_model_facts(model_config: Mapping[str, Any] | None) -> tuple[dict[str, Kind], dict[str, str]] | None:
    """Per module name its layer type (``linear``/``conv1d``/``embedding``/``other``) and the tied weights
    (alias -> the key stored, e.g. ``lm_head.weight`` -> ``transformer.wte.weight``) of the model ``config.json``
    describes, read off the model built on the ``meta`` device (no memory); None where transformers is missing,
    the config names no architecture transformers has, or the model cannot be built.

    Where this process has not imported transformers, the model is built in a short-lived child interpreter
    (``python -m lora_ckpt.formats.hf``), so transformers' ~110 MB never joins a merge's or extraction's memory.
    """
    if model_config is None or not model_config.get("architectures"):
        return None
    if "transformers" not in sys.modules:
        if importlib.util.find_spec("transformers") is None:
            return None
        try:
            done = subprocess.run([sys.executable, "-m", "lora_ckpt.formats.hf"], input=json.dumps(model_config),
                                  capture_output=True, text=True, timeout=600, check=True)
            facts = json.loads(done.stdout)
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            log.info("could not read the layer types in a child interpreter (%s)", e)
            return None
        return None if facts is None else (facts["kinds"], facts["tied"])
    return _facts_here(model_config)


def _facts_here(model_config: Mapping[str, Any]) -> tuple[dict[str, Kind], dict[str, str]] | None:
    try:
        import transformers
    except ImportError:
        return None
    arch = model_config["architectures"][0]
    cls = getattr(transformers, str(arch), None)
    if cls is None:
        return None
    try:
        config = transformers.AutoConfig.for_model(**dict(model_config))
        with torch.device("meta"), warnings_quiet():
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - an unusual config: callers fall back to weaker facts
        log.info("could not build %s on the meta device (%s)", arch, e)
        return None
    conv1d = getattr(getattr(transformers, "pytorch_utils", None), "Conv1D", None)
    kinds: dict[str, Kind] = {}
    for name, module in model.named_modules():
        if conv1d is not None and isinstance(module, conv1d):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif hasattr(module, "weight") and isinstance(getattr(module, "weight"), torch.nn.Parameter):
            kinds[name] = "other"
    owners: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = owners.setdefault(id(p), name)
        if first != name:
            tied[name] = first
    return kinds, tied


def tied_weights(model_config: Mapping[str, Any] | None) -> dict[str, str]:
    """The weights the model of ``config.json`` ties (alias -> the key ``save_pretrained`` stores; the alias is
    left out of its files); {} where :func:`meta_model_facts` cannot tell.

    Example:
        >>> cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 1, "n_embd": 8,
        ...        "n_head": 2, "vocab_size": 16, "n_positions": 8, "bos_token_id": 0, "eos_token_id": 0}
        >>> tied_weights(cfg)
        {'lm_head.weight': 'transformer.wte.weight'}
    """
    facts = meta_model_facts(model_config)
    return facts[1] if facts is not None else {}


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    """Silence library warnings while a meta model is built (they are about the model, not the user's files)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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


if __name__ == "__main__":  # the child of meta_model_facts: config.json on stdin, the facts as JSON on stdout
    _facts = _facts_here(json.load(sys.stdin))
    print(json.dumps(None if _facts is None else {"kinds": _facts[0], "tied": _facts[1]}))
