"""pytest plugin (entry point ``pytest11: lora_ckpt``): the :mod:`lora_ckpt.testing` factories as fixtures.

pytest loads this in every run of every project that installed lora-ckpt, so it imports nothing heavy:
torch and the factories are imported by a fixture when a test asks for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch


@pytest.fixture
def nanogpt() -> torch.nn.Module:
    """A tiny plain nanoGPT (seed 0: 2 layers, 2 heads, n_embd 32, vocab 64, block 16), ``wte`` tied to ``lm_head``."""
    from lora_ckpt import testing

    return testing.make_gpt(seed=0)


@pytest.fixture
def nanogpt_lora() -> torch.nn.Module:
    """The ``nanogpt`` fixture's model with LoRA (rank 4, alpha 16) on ``c_attn`` and ``wte``: the same base weights
    (each ``main_weight`` equals ``nanogpt``'s weight), adapters randomised (seed 1)."""
    from lora_ckpt import testing

    return testing.make_gpt(seed=0, attn_rank=4, wte_rank=4, randomize=True)


@pytest.fixture
def lora_state_dict() -> dict[str, torch.Tensor]:
    """A nanoGPT LoRA state dict (rank 4 on ``c_attn``, alpha 16, base weights ``nanogpt``'s) with random adapters."""
    from lora_ckpt import testing

    return testing.make_lora_state_dict(rank=4)


@pytest.fixture
def tokens() -> torch.Tensor:
    """A seeded (2, 8) batch of token ids for the tiny models."""
    from lora_ckpt import testing

    return testing.make_tokens()
