"""Memory that goes back to the system when it is freed.

glibc serves an allocation below its mmap threshold from its heap and keeps it there once freed, and the
threshold moves up to 32 MB as large blocks are freed; a loop over large tensors of changing sizes can then hold
hundreds of MB it no longer uses. Buffers from :func:`mapped_empty` live in their own anonymous memory map,
unmapped the moment the tensor is freed; :func:`release_freed` returns what the heap holds free between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
from typing import Any

import torch

__all__ = ["mapped_empty", "release_freed"]


@functools.lru_cache(maxsize=1)
def _trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def release_freed() -> None:
    """Return the heap memory that glibc holds free to the system (``malloc_trim(0)``); a no-op elsewhere.

    >>> release_freed()
    """
    trim = _trim()
    if trim is not None:
        trim(0)


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous memory map (no heap): its pages are the system's again
    as soon as the tensor, and every view of it, is freed. For large buffers that a loop reuses.

    >>> t = mapped_empty((3, 4), torch.float32)
    >>> t.fill_(1.0).sum(0).tolist()
    [3.0, 3.0, 3.0, 3.0]
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes)  # torch.frombuffer holds a reference: unmapped with the last view
    return torch.frombuffer(pages, dtype=dtype, count=math.prod(shape)).view(shape)
