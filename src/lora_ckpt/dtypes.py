"""Dtype names: the one table of the names lora_ckpt accepts for a dtype, in Python and on the command line.

Torch is imported only when a name is turned into a dtype, so the CLI can list the names without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_NAMES", "DType", "as_dtype"]

#: name -> the ``torch`` attribute it means (floating-point dtypes: what a merge may write).
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "float": "float32",
               "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16", "half": "float16",
               "fp64": "float64", "float64": "float64", "double": "float64"}

DType = Union["torch.dtype", str]


def as_dtype(value: DType | None) -> torch.dtype | None:
    """Return the floating-point ``torch.dtype`` that ``value`` names (a dtype, ``"bf16"``, ``"torch.float16"`` ...).

    Raises:
        ValueError: a name or dtype that is not a floating-point dtype, listing the names accepted.

    >>> as_dtype("bf16"), as_dtype("torch.float16"), as_dtype(None)
    (torch.bfloat16, torch.float16, None)
    """
    import torch

    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ValueError(f"dtype={value}: not a floating-point dtype; merged weights need one "
                             f"(torch.bfloat16, torch.float16, torch.float32, torch.float64)")
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in DTYPE_NAMES:
        return getattr(torch, DTYPE_NAMES[value.lower().removeprefix("torch.")])  # type: ignore[no-any-return]
    raise ValueError(f"dtype={value!r}: not a dtype lora_ckpt knows; give a torch.dtype or one of "
                     f"{', '.join(repr(n) for n in DTYPE_NAMES)}")
