"""Progress bars: the one place lora_ckpt makes one (tqdm, from the optional ``[progress]`` extra).

Without tqdm there is no bar, and a warning says so once per process on the ``lora_ckpt`` logger (the CLI
shows it on stderr).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

__all__ = ["progress_bar"]

log = logging.getLogger("lora_ckpt")


@functools.lru_cache(maxsize=1)
def _no_tqdm() -> None:
    log.warning("no progress bar: tqdm is not installed (pip install 'lora-ckpt[progress]', or pass --quiet)")


def progress_bar(total: int, label: str, *, unit: str = "B") -> Any:
    """A tqdm bar of ``total`` units labelled by what the work does (``"merging"``), or None without tqdm.

    ``unit="B"`` counts bytes in binary multiples; any other unit (``"param"``) counts in decimal ones.
    """
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:  # the progress extra is not installed: say so once
        _no_tqdm()
        return None
    return tqdm(total=total, unit=unit, unit_scale=unit != "tensor", unit_divisor=1024 if unit == "B" else 1000,
                desc=label, dynamic_ncols=True)
