"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Reads the scale of every module the way PEFT computes it (``lora_alpha / r``, ``/ sqrt(r)`` with
rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``) and writes folders PEFT loads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_ckpt.errors import AlphaError, CheckpointFileError, LayoutError, ShapeError
from lora_ckpt.io import write_checkpoint
from lora_ckpt.layout import PEFT, Layout, detect_layout
from lora_ckpt.output import Output, PathLike
from lora_ckpt.source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Source

__all__ = ["PeftAdapter", "is_peft_dir", "load_peft_adapter", "pattern_key", "peft_config", "save_peft_adapter",
           "write_peft_adapter"]

CONFIG_NAME = ADAPTER_CONFIG
WEIGHT_NAMES = ADAPTER_WEIGHTS


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter: its tensors (PEFT's saved keys), its config and the layout found in them."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    layout: Layout
    path: Path | None = None
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))


def is_peft_dir(path: PathLike) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter config."""
    return (Path(path) / CONFIG_NAME).is_file()


def pattern_key(patterns: list[str], name: str) -> str | None:
    """The first pattern (in order) whose regex matches the end of ``name`` at a component boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def peft_scales(config: Mapping[str, Any], layout: Layout) -> dict[str, float]:
    """Return PEFT's scaling for each module with factors; raise where the config disagrees with the tensors."""
    r0, alpha0 = config.get("r"), config.get("lora_alpha")
    if r0 is None or alpha0 is None:
        raise AlphaError("the PEFT config has no 'r' or 'lora_alpha'; it cannot say how to scale the update")
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))
    out: dict[str, float] = {}
    problems: list[str] = []
    for m in layout.modules:
        if not m.has_factors:
            continue
        rk, ak = pattern_key(list(ranks), m.name), pattern_key(list(alphas), m.name)
        r = int(ranks[rk]) if rk is not None else int(r0)
        alpha = float(alphas[ak]) if ak is not None else float(alpha0)
        if r != m.rank:
            problems.append(f"{m.name}: the config says rank {r}, the tensors have rank {m.rank}")
        out[m.name] = alpha / math.sqrt(m.rank) if rslora else alpha / m.rank
    if problems:
        raise ShapeError("; ".join(problems) + "; is adapter_config.json the adapter's own?")
    return out


def _check_supported(config: Mapping[str, Any], where: Path) -> None:
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise LayoutError(f"{where}: peft_type {kind!r} is not LoRA; lora_ckpt merges LoRA adapters only")
    if config.get("target_parameters"):
        raise LayoutError(
            f"{where}: target_parameters {config['target_parameters']} (LoRA on raw parameters, e.g. MoE experts) "
            "is not supported"
        )
    for option in ("use_qalora", "layer_replication", "trainable_token_indices"):
        if config.get(option):
            raise LayoutError(f"{where}: PEFT option {option}={config[option]!r} is not supported")


def load_peft_adapter(path: PathLike | Source) -> PeftAdapter:
    """Return the PEFT adapter stored in the folder ``path`` (config read, scales resolved, shapes checked).

    Raises:
        CheckpointFileError: no config or no weights file, or an unreadable one.
        LayoutError: not a LoRA adapter, or an unsupported variant (named).
        ShapeError, AlphaError: config and tensors disagree.
    """
    if isinstance(path, Source):
        return _adapter(path)
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointFileError(f"{folder}: no {CONFIG_NAME}; a PEFT adapter folder needs its config")
    with Source.open(folder) as source:
        return _adapter(source)


def _adapter(source: Source) -> PeftAdapter:
    if source.kind != "peft" or source.config is None:
        raise CheckpointFileError(f"{source.path}: not a PEFT adapter folder (no {CONFIG_NAME})")
    config = source.config
    _check_supported(config, source.path / CONFIG_NAME)
    sd = source.load().state_dict
    layout = detect_layout(sd, layout=PEFT.name)
    adapter = PeftAdapter(sd, config, layout, source.path)
    adapter.scales = peft_scales(config, layout)
    return adapter


def peft_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Mapping[str, float],
    fan_in_fan_out: bool = False,
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` for PEFT-keyed ``state_dict`` with ``alpha`` per module.

    ``r`` and ``lora_alpha`` are the most common values; other modules get exact ``rank_pattern`` /
    ``alpha_pattern`` entries.
    """
    layout = detect_layout(state_dict, layout=PEFT.name)
    ranks = {m.name: m.rank for m in layout.modules if m.has_factors}
    rank = max(sorted(set(ranks.values())), key=list(ranks.values()).count)
    alpha0 = max(sorted(set(alpha.values())), key=list(alpha.values()).count)
    use_dora = any(m.is_dora for m in layout.modules)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha0,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ranks}),
        "fan_in_fan_out": fan_in_fan_out,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(n): a for n, a in alpha.items() if a != alpha0},
        "use_rslora": False,
        "use_dora": use_dora,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        **dict(extra_config or {}),
    }


def save_peft_adapter(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Mapping[str, float],
    fan_in_fan_out: bool = False,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT adapter folder (config + ``adapter_model.safetensors``); returns the folder.

    ``state_dict`` holds PEFT's saved keys (``base_model.model.<module>.lora_A.weight`` …) and
    ``alpha`` the alpha per module (see :func:`peft_config`). The folder is assembled beside the target
    and moved into place; an existing adapter is replaced only with ``overwrite=True``.
    """
    out = Output.prepare(path, overwrite=overwrite, folder=True)
    with out.writing() as tmp:
        write_peft_adapter(tmp, state_dict, alpha=alpha, fan_in_fan_out=fan_in_fan_out, extra_config=extra_config)
    return out.path


def write_peft_adapter(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Mapping[str, float],
    fan_in_fan_out: bool = False,
    extra_config: Mapping[str, Any] | None = None,
) -> None:
    """Fill the (staging) folder ``folder`` with the adapter as :func:`save_peft_adapter` does."""
    config = peft_config(state_dict, alpha=alpha, fan_in_fan_out=fan_in_fan_out, extra_config=extra_config)
    write_checkpoint(folder / WEIGHT_NAMES[0], dict(state_dict))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
