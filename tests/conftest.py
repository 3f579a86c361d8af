"""Shared helpers; the factories themselves come from lora_ckpt.testing (and its pytest plugin)."""

from __future__ import annotations

import torch

from lora_ckpt.testing import make_gpt, make_tokens


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


__all__ = ["assert_unchanged", "compiled", "logits", "make_gpt", "snapshot"]
