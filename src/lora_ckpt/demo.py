"""The built-in example behind ``lora-ckpt demo``: train a tiny nanoGPT LoRA model, convert both ways, compare."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_ckpt.convert import LoadReport
from lora_ckpt.io import load_checkpoint, save_checkpoint
from lora_ckpt.merge import merge_lora
from lora_ckpt.model import load_into
from lora_ckpt.testing import GPT, make_gpt, make_tokens

__all__ = ["DemoStep", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoStep:
    """One conversion of the demo and how far the converted model's logits are from the original's."""

    name: str
    path: Path
    max_abs_diff: float
    ok: bool
    report: LoadReport | None = None


def _train(model: GPT, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(model.config.vocab_size, (4, 9), generator=gen)
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def run_demo(
    out_dir: str | Path,
    *,
    steps: int = 20,
    seed: int = 0,
    on_step: Callable[[DemoStep], None] | None = None,
) -> list[DemoStep]:
    """Train a tiny LoRA nanoGPT (rank 4 on ``c_attn``, rank 2 on the tied ``wte``) and round-trip it.

    Writes into ``out_dir``: the LoRA checkpoint (``lora.pt``), its merge (``merged.safetensors``) and
    that merge converted back to a LoRA layout (``lora_again.pt``). Each step reloads a file into a
    fresh model and compares logits with the trained model's; returns the steps in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora = make_gpt(seed=seed, attn_rank=4, wte_rank=2, alpha=8.0)
    _train(lora, steps, seed)
    tokens = make_tokens(seed=seed + 1, batch=4, length=12)
    with torch.no_grad():
        expected = lora(tokens)
    model_args = {"n_layer": 2, "n_embd": 32, "lora_alpha": 8.0, "lora_rank": 4}
    steps_done: list[DemoStep] = []

    def check(name: str, path: Path, model: torch.nn.Module, report: LoadReport | None) -> None:
        with torch.no_grad():
            diff = (model(tokens) - expected).abs().max().item()
        step = DemoStep(name, path, diff, torch.allclose(model(tokens), expected, rtol=1e-4, atol=1e-5), report)
        steps_done.append(step)
        if on_step is not None:
            on_step(step)

    lora_path = save_checkpoint(
        out / "lora.pt", lora.state_dict(), extra={"model_args": model_args, "iter_num": steps}, overwrite=True
    )
    again = make_gpt(seed=seed + 7, attn_rank=4, wte_rank=2, alpha=8.0)
    check("LoRA file -> LoRA model (copy)", lora_path, again, load_into(again, lora_path))

    ckpt = load_checkpoint(lora_path)
    merged_path = save_checkpoint(out / "merged.safetensors", merge_lora(ckpt.state_dict, alpha=ckpt.alpha), overwrite=True)
    plain = make_gpt(seed=seed + 8)
    check("merged file -> plain nanoGPT (untied)", merged_path, plain, load_into(plain, merged_path, tied="untie"))

    relora = make_gpt(seed=seed + 9, attn_rank=8, wte_rank=None, alpha=16.0)
    relora.lm_head.weight = torch.nn.Parameter(relora.lm_head.weight.detach().clone())  # untied, like the merge
    report = load_into(relora, merged_path)
    back_path = save_checkpoint(out / "lora_again.pt", relora.state_dict(), alpha=16.0, overwrite=True)
    fresh = make_gpt(seed=seed + 10, attn_rank=8, wte_rank=None, alpha=16.0)
    fresh.lm_head.weight = torch.nn.Parameter(fresh.lm_head.weight.detach().clone())
    load_into(fresh, back_path)
    check("merged file -> LoRA model rank 8 -> file -> model", back_path, fresh, report)
    return steps_done
