"""The exception hierarchy: every error lora_ckpt raises on bad input is a :class:`LoraCkptError`.

Also :func:`brief`, how a message shows a value read from input.
"""

from __future__ import annotations

import reprlib

__all__ = [
    "AlphaError",
    "CheckpointFileError",
    "KeyMismatchError",
    "LayoutError",
    "LoraCkptError",
    "ShapeError",
    "TiedWeightError",
    "UnsafeCheckpointError",
    "brief",
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


class _BriefRepr(reprlib.Repr):
    """``reprlib`` limits for input values: a few dozen characters, three levels, tensors by shape."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 80, 80, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6

    def repr_OrderedDict(self, x: dict[object, object], level: int) -> str:  # noqa: N802 - reprlib's naming
        return self.repr_dict(x, level)

    def repr_Tensor(self, x: object, level: int) -> str:  # noqa: N802
        return f"<tensor of shape {tuple(x.shape)}>"  # type: ignore[attr-defined]

    repr_Parameter = repr_Tensor


_BRIEF = _BriefRepr()


def brief(value: object) -> str:
    """Return a one-line repr of ``value`` cut to a few dozen characters and three levels; it never raises.

    For error messages that show a value read from a file: a 10 MB string, a structure nested past the
    recursion limit or a tensor shows as a short text (a value whose repr fails shows as its type).

    Example:
        >>> brief("x" * 1000)[:12], brief([[[[1]]]]), brief(10**400)
        ("'xxxxxxxxxxx", '[[[[...]]]]', '100000000000000000...0000000000000000000')
    """
    try:
        text = _BRIEF.repr(value)
    except Exception:  # noqa: BLE001 - a hostile value (nested past the recursion limit, an int too long to print)
        text = f"<{type(value).__name__}>"
    return " ".join(text.split())
