"""Giving freed memory back: glibc keeps freed heap blocks for reuse, so a loop over large tensors of changing
sizes can hold hundreds of MB it no longer uses. :func:`release_freed` returns them to the system between steps."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["release_freed"]


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
