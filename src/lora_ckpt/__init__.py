"""lora_ckpt: make model checkpoints portable between standard and LoRA layouts.

The pure core (:func:`detect_layout`, :func:`merge_lora`, :func:`remap_standard_to_lora`) works on
plain state dicts; :func:`load_into` and :func:`merged_state_dict` adapt live models; files are read
and written by :func:`load_checkpoint` and :func:`save_checkpoint`, and merged or converted file to
file by :func:`stream_merge` / :func:`stream_convert`. Names are imported on first use, so
``import lora_ckpt`` (and the command line's ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lora_ckpt._version import __version__
from lora_ckpt.errors import (
    AlphaError,
    CheckpointFileError,
    KeyMismatchError,
    LayoutError,
    LoraCkptError,
    ShapeError,
    TiedWeightError,
    UnsafeCheckpointError,
)

if TYPE_CHECKING:
    from lora_ckpt.adapter import merge_adapter
    from lora_ckpt.files import FileResult, convert_files, merge_files
    from lora_ckpt.output import Output
    from lora_ckpt.source import Source
    from lora_ckpt.io import Checkpoint, load_checkpoint, save_checkpoint
    from lora_ckpt.layout import Layout, LoraModule, detect_layout
    from lora_ckpt.merge import merge_lora
    from lora_ckpt.lowrank import LowRankReport, LowRankResult, RankRule, combine_lora, extract_lora, resize_lora, unmerge_lora
    from lora_ckpt.lowrank_files import LowRankFileResult, combine_files, extract_files, resize_files, unmerge_files
    from lora_ckpt.model import LoadReport, load_into, merged_state_dict, module_alphas
    from lora_ckpt.optim import OptimizerReport, named_optimizer_state, transfer_optimizer_state
    from lora_ckpt.relayout import Relayout, convert_layout
    from lora_ckpt.remap import remap_standard_to_lora
    from lora_ckpt.streaming import StreamOptions, StreamReport, stream_convert, stream_merge

_LAZY = {
    "FileResult": "lora_ckpt.files",
    "convert_files": "lora_ckpt.files",
    "merge_files": "lora_ckpt.files",
    "Output": "lora_ckpt.output",
    "Source": "lora_ckpt.source",
    "StreamOptions": "lora_ckpt.streaming",
    "Checkpoint": "lora_ckpt.io",
    "load_checkpoint": "lora_ckpt.io",
    "save_checkpoint": "lora_ckpt.io",
    "Layout": "lora_ckpt.layout",
    "LoraModule": "lora_ckpt.layout",
    "detect_layout": "lora_ckpt.layout",
    "merge_lora": "lora_ckpt.merge",
    "LowRankReport": "lora_ckpt.lowrank",
    "LowRankResult": "lora_ckpt.lowrank",
    "RankRule": "lora_ckpt.lowrank",
    "combine_lora": "lora_ckpt.lowrank",
    "extract_lora": "lora_ckpt.lowrank",
    "resize_lora": "lora_ckpt.lowrank",
    "unmerge_lora": "lora_ckpt.lowrank",
    "LowRankFileResult": "lora_ckpt.lowrank_files",
    "combine_files": "lora_ckpt.lowrank_files",
    "extract_files": "lora_ckpt.lowrank_files",
    "resize_files": "lora_ckpt.lowrank_files",
    "unmerge_files": "lora_ckpt.lowrank_files",
    "merge_adapter": "lora_ckpt.adapter",
    "LoadReport": "lora_ckpt.model",
    "load_into": "lora_ckpt.model",
    "merged_state_dict": "lora_ckpt.model",
    "module_alphas": "lora_ckpt.model",
    "OptimizerReport": "lora_ckpt.optim",
    "named_optimizer_state": "lora_ckpt.optim",
    "transfer_optimizer_state": "lora_ckpt.optim",
    "Relayout": "lora_ckpt.relayout",
    "convert_layout": "lora_ckpt.relayout",
    "remap_standard_to_lora": "lora_ckpt.remap",
    "StreamReport": "lora_ckpt.streaming",
    "stream_convert": "lora_ckpt.streaming",
    "stream_merge": "lora_ckpt.streaming",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AlphaError",
    "Checkpoint",
    "CheckpointFileError",
    "FileResult",
    "KeyMismatchError",
    "Layout",
    "LayoutError",
    "LoadReport",
    "LoraCkptError",
    "LoraModule",
    "LowRankFileResult",
    "LowRankReport",
    "LowRankResult",
    "OptimizerReport",
    "Output",
    "RankRule",
    "Relayout",
    "ShapeError",
    "Source",
    "StreamOptions",
    "StreamReport",
    "TiedWeightError",
    "UnsafeCheckpointError",
    "__version__",
    "combine_files",
    "combine_lora",
    "convert_files",
    "convert_layout",
    "detect_layout",
    "extract_files",
    "extract_lora",
    "load_checkpoint",
    "load_into",
    "merge_adapter",
    "merge_files",
    "merge_lora",
    "merged_state_dict",
    "module_alphas",
    "named_optimizer_state",
    "remap_standard_to_lora",
    "resize_files",
    "resize_lora",
    "save_checkpoint",
    "stream_convert",
    "stream_merge",
    "transfer_optimizer_state",
    "unmerge_files",
    "unmerge_lora",
]
