"""Reference nanoGPT models, plain and with LoRA, as in karpathy's nanoGPT and the LoRA fork.

Small enough to build in milliseconds; used by the tests, the demo and anyone's fixtures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "LoRAEmbedding", "LoRALinear"]


class LoRALinear(nn.Module):
    """``main_weight(x) + (alpha / rank) · lora_B(lora_A(x))``; rank 0 leaves only ``main_weight``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = True) -> None:
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.main_weight = nn.Linear(in_features, out_features, bias=bias)
        self.main_weight.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, rank, bias=False) if rank > 0 else None
        self.lora_B = nn.Linear(rank, out_features, bias=False) if rank > 0 else None
        if self.lora_B is not None:
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.main_weight(x)
        if self.lora_A is not None and self.lora_B is not None:
            y = y + (self.alpha / self.rank) * self.lora_B(self.lora_A(x))
        return y


class LoRAEmbedding(nn.Module):
    """``main_weight[idx] + (alpha / rank) · lora_B(lora_A[idx])``; lora-only drops ``main_weight``."""

    def __init__(self, vocab: int, n_embd: int, rank: int, alpha: float, lora_only: bool = False) -> None:
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.main_weight = None if lora_only else nn.Embedding(vocab, n_embd)
        if self.main_weight is not None:
            self.main_weight.requires_grad_(False)
        self.lora_A = nn.Embedding(vocab, rank) if rank > 0 else None
        self.lora_B = nn.Linear(rank, n_embd, bias=False) if rank > 0 else None
        if self.lora_B is not None and not lora_only:
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = self.main_weight(idx) if self.main_weight is not None else 0
        if self.lora_A is not None and self.lora_B is not None:
            y = y + (self.alpha / self.rank) * self.lora_B(self.lora_A(idx))
        return y  # type: ignore[return-value]


@dataclass
class GPTConfig:
    """nanoGPT's config plus the fork's LoRA switches (``None`` rank: the plain module)."""

    block_size: int = 16
    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    bias: bool = True
    attn_rank: int | None = None
    wte_rank: int | None = None
    wte_lora_only: bool = False
    lora_alpha: float = 16.0


class _Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.attn_rank is None:
            self.c_attn: nn.Module = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        else:
            self.c_attn = LoRALinear(cfg.n_embd, 3 * cfg.n_embd, cfg.attn_rank, cfg.lora_alpha, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head = cfg.n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = _Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT: ``transformer.{wte, wpe, h.N, ln_f}`` and ``lm_head`` tied to the token embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.wte_rank is None:
            wte: nn.Module = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        else:
            wte = LoRAEmbedding(cfg.vocab_size, cfg.n_embd, cfg.wte_rank, cfg.lora_alpha, cfg.wte_lora_only)
        self.transformer = nn.ModuleDict(
            dict(
                wte=wte,
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if isinstance(wte, nn.Embedding):
            wte.weight = self.lm_head.weight
        elif isinstance(wte, LoRAEmbedding) and wte.main_weight is not None:
            wte.main_weight.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = t["wte"](idx) + t["wpe"](pos)
        for block in t["h"]:  # type: ignore[attr-defined]
            x = block(x)
        return self.lm_head(t["ln_f"](x))
