"""lora_ckpt: make model checkpoints portable between standard and LoRA layouts.

The pure core (:func:`detect_layout`, :func:`merge_lora`, :func:`remap_standard_to_lora`) works on
plain state dicts; :func:`load_into` and :func:`merged_state_dict` adapt live models; files are read
and written by :func:`load_checkpoint` and :func:`save_checkpoint`.
"""

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
from lora_ckpt.io import Checkpoint, load_checkpoint, save_checkpoint
from lora_ckpt.layout import Layout, LoraModule, detect_layout
from lora_ckpt.merge import merge_lora
from lora_ckpt.adapter import merge_adapter
from lora_ckpt.model import LoadReport, load_into, merged_state_dict, module_alphas
from lora_ckpt.optim import OptimizerReport, named_optimizer_state, transfer_optimizer_state
from lora_ckpt.relayout import Relayout, convert_layout
from lora_ckpt.remap import remap_standard_to_lora
from lora_ckpt.stream import StreamReport, stream_merge
from lora_ckpt.stream_convert import stream_convert

from lora_ckpt._version import __version__

__all__ = [
    "AlphaError",
    "Checkpoint",
    "CheckpointFileError",
    "KeyMismatchError",
    "Layout",
    "LayoutError",
    "LoadReport",
    "LoraCkptError",
    "LoraModule",
    "OptimizerReport",
    "Relayout",
    "ShapeError",
    "StreamReport",
    "TiedWeightError",
    "UnsafeCheckpointError",
    "__version__",
    "convert_layout",
    "detect_layout",
    "load_checkpoint",
    "load_into",
    "merge_adapter",
    "merge_lora",
    "merged_state_dict",
    "module_alphas",
    "named_optimizer_state",
    "remap_standard_to_lora",
    "save_checkpoint",
    "stream_convert",
    "stream_merge",
    "transfer_optimizer_state",
]
