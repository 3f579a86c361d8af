"""Buffers that go back to the system when freed (the extraction's memory bound rests on them)."""

import sys
from pathlib import Path

import pytest
import torch

from lora_ckpt.memory import mapped_empty, release_freed

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def _resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_mapped_buffer_is_returned_the_moment_it_is_freed():
    release_freed()
    before = _resident_mb()
    t = mapped_empty((16, 1 << 20), torch.float32)  # 64 MiB
    view = t[3:5]
    t.fill_(1.0)  # every page touched
    assert _resident_mb() - before > 60
    del t
    assert _resident_mb() - before > 60  # a view keeps the whole map
    assert float(view.sum()) == 2 * (1 << 20)
    del view
    assert _resident_mb() - before < 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.uint8])
def test_mapped_buffer_shapes_and_dtypes(dtype):
    t = mapped_empty((3, 5, 7), dtype)
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.is_contiguous()
    t.copy_(torch.arange(105).reshape(3, 5, 7))
    assert torch.equal(t, torch.arange(105).reshape(3, 5, 7).to(dtype))
    assert mapped_empty((0, 4), dtype).shape == (0, 4)
