"""The exception hierarchy: every error lora_ckpt raises on bad input is a :class:`LoraCkptError`."""

from __future__ import annotations

__all__ = [
    "AlphaError",
    "CheckpointFileError",
    "KeyMismatchError",
    "LayoutError",
    "LoraCkptError",
    "ShapeError",
    "TiedWeightError",
    "UnsafeCheckpointError",
]


class LoraCkptError(Exception):
    """Base class of every error lora_ckpt raises on bad input."""


class LayoutError(LoraCkptError):
    """The keys do not form one recognisable layout (mixed, ambiguous or unknown)."""


class ShapeError(LoraCkptError):
    """LoRA factors or weights have shapes that do not fit together."""


class KeyMismatchError(LoraCkptError):
    """A checkpoint and its target disagree on keys: something is missing or left unused."""


class AlphaError(LoraCkptError):
    """The LoRA alpha needed for a merge is unknown, inconsistent or names unknown modules."""


class TiedWeightError(LoraCkptError):
    """A LoRA update lands on a weight that the target model ties to another key."""


class CheckpointFileError(LoraCkptError):
    """A checkpoint file is missing, corrupt, truncated or of an unknown format, or cannot be written."""


class UnsafeCheckpointError(CheckpointFileError):
    """A pickle checkpoint would need to run code to load; lora_ckpt refuses it."""
