"""Shared helpers; the factories themselves come from lora_ckpt.testing (and its pytest plugin)."""

from __future__ import annotations

import pytest
import torch

from lora_ckpt.testing import make_gpt, make_tokens
from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint


def logits(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(make_tokens(seed=3, batch=2, length=12))


def snapshot(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deep copy of a state dict, to prove later that it was not changed."""
    return {k: v.detach().clone() for k, v in sd.items()}


def assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert list(before) == list(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """A torch.compile wrapper (``_orig_mod.`` keys) without paying for code generation."""
    return torch.compile(model, backend="eager")



@pytest.fixture
def llama(tmp_path):
    """A 3-layer fp32 Llama folder sharded at 200 kB (``base``) and a rank-8 PEFT adapter for it (``adapter``)."""
    shape = LlamaShape(hidden=64, intermediate=172, layers=3, vocab=128)
    write_llama_checkpoint(tmp_path / "base", shape, dtype=torch.float32, shard_bytes=200_000)
    write_llama_adapter(tmp_path / "adapter", shape, rank=8, alpha=16.0, dtype=torch.float32)
    return tmp_path / "base", tmp_path / "adapter"


__all__ = ["assert_unchanged", "compiled", "logits", "make_gpt", "snapshot"]
