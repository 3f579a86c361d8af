"""Seeded factories for nanoGPT and nanoGPT-LoRA models and state dicts, and a state-dict assertion.

Also available as pytest fixtures (``nanogpt``, ``nanogpt_lora``, ``lora_state_dict``, ``tokens``)
through the ``lora_ckpt`` pytest plugin, which is registered when lora-ckpt is installed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lora_ckpt.testing.nanogpt import GPT, GPTConfig, LoRAEmbedding, LoRALinear

__all__ = [
    "GPT",
    "GPTConfig",
    "LoRAEmbedding",
    "LoRALinear",
    "assert_state_dict_close",
    "make_gpt",
    "make_lora_state_dict",
    "make_state_dict",
    "make_tokens",
    "randomize_lora",
]


def make_gpt(
    *,
    seed: int = 0,
    attn_rank: int | None = None,
    wte_rank: int | None = None,
    wte_lora_only: bool = False,
    alpha: float = 16.0,
    randomize: bool = False,
    dtype: torch.dtype = torch.float32,
    **config: object,
) -> GPT:
    """Return a tiny seeded nanoGPT; LoRA on ``c_attn``/``wte`` where a rank is given.

    The base weights depend on ``seed`` and the model shape only: ``make_gpt(seed=s, attn_rank=4)``'s
    ``main_weight`` tensors equal ``make_gpt(seed=s)``'s weights, whatever the LoRA settings.
    ``randomize=True`` gives every LoRA factor random non-zero values (a "trained" adapter, seed ``seed + 1``).
    Extra keyword arguments go to :class:`GPTConfig` (``n_layer``, ``n_embd``, ``vocab_size`` …).
    """
    torch.manual_seed(seed)
    cfg = GPTConfig(attn_rank=attn_rank, wte_rank=wte_rank, wte_lora_only=wte_lora_only, lora_alpha=alpha, **config)  # type: ignore[arg-type]
    model = GPT(cfg)
    if attn_rank or wte_rank:  # the plain model's weights, so every LoRA variant shares its base
        torch.manual_seed(seed)
        plain = GPT(GPTConfig(lora_alpha=alpha, **config)).state_dict()  # type: ignore[arg-type]
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                source = plain.get(key.replace(".main_weight.", "."))
                if source is not None and ".lora_" not in key:
                    value.copy_(source)
    if randomize:
        randomize_lora(model, seed=seed + 1)
    return model.to(dtype).eval()


def randomize_lora(model: torch.nn.Module, *, seed: int = 1, std: float = 0.05) -> torch.nn.Module:
    """Fill every ``lora_A``/``lora_B`` weight of ``model`` with seeded normal values; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in f".{name}" or ".lora_B." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def make_state_dict(*, seed: int = 0, prefix: str = "", **config: object) -> dict[str, torch.Tensor]:
    """Return a plain nanoGPT state dict (``wte`` tied to ``lm_head``), keys prefixed by ``prefix``."""
    return {prefix + k: v for k, v in make_gpt(seed=seed, **config).state_dict().items()}  # type: ignore[arg-type]


def make_lora_state_dict(
    *,
    rank: int = 4,
    wte_rank: int | None = None,
    seed: int = 0,
    prefix: str = "",
    **config: object,
) -> dict[str, torch.Tensor]:
    """Return a nanoGPT LoRA state dict with random non-zero adapters on ``c_attn`` (and ``wte``)."""
    model = make_gpt(seed=seed, attn_rank=rank, wte_rank=wte_rank, randomize=True, **config)  # type: ignore[arg-type]
    return {prefix + k: v for k, v in model.state_dict().items()}


def make_tokens(*, seed: int = 0, batch: int = 2, length: int = 8, vocab_size: int = 64) -> torch.Tensor:
    """Return a seeded batch of token ids, shape ``(batch, length)``."""
    return torch.randint(vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_state_dict_close(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    check_dtype: bool = True,
) -> None:
    """Assert both state dicts have the same keys and close tensors (``torch.testing.assert_close``).

    ``rtol=0, atol=0`` asks for bit-identical values. The message names the differing keys.
    """
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing or extra:
        raise AssertionError(f"state dict keys differ: missing {missing}, unexpected {extra}")
    for key in expected:
        torch.testing.assert_close(
            actual[key],
            expected[key],
            rtol=rtol,
            atol=atol,
            check_dtype=check_dtype,
            check_device=False,
            msg=lambda m, key=key: f"{key}: {m}",  # type: ignore[misc]
        )
