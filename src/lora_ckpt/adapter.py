"""Merging an adapter file or folder into a base model's weights (PEFT folders, kohya, any LoRA file)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from lora_ckpt.dtypes import DType, as_dtype
from lora_ckpt.errors import AlphaError, TiedWeightError
from lora_ckpt.formats.hf import tied_weights
from lora_ckpt.formats.peft import adapter_orientation, load_peft_adapter
from lora_ckpt.io import Checkpoint, PathLike, as_checkpoint
from lora_ckpt.layout import PEFT, Layout, detect_layout, split_prefix
from lora_ckpt.merge import Alpha, MergePlan, Step, module_factors, plan_merge, require_data
from lora_ckpt.source import Source

__all__ = ["merge_adapter", "plan_adapter_merge"]

log = logging.getLogger(__name__)


def merge_adapter(
    base: Mapping[str, torch.Tensor] | PathLike,
    adapter: Checkpoint | Mapping[str, Any] | PathLike,
    *,
    alpha: Alpha | None = None,
    dtype: DType | None = None,
) -> dict[str, torch.Tensor]:
    """Return the base model's state dict with the adapter merged in; neither input is changed.

    ``base`` is a standard state dict, a weights file, or a Hugging Face model folder (sharded too).
    ``adapter`` is a PEFT adapter folder (scales from its ``adapter_config.json``: ``r``,
    ``lora_alpha``, rsLoRA, ``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out``, DoRA,
    ``modules_to_save``), a kohya file (alphas from its tensors) or any LoRA file or state dict.

    Raises:
        CheckpointFileError, LayoutError, ShapeError, AlphaError, KeyMismatchError: as the inputs are
            read and checked; nothing is computed before every module has been matched to the base.
    """
    dtype = as_dtype(dtype)
    model_config = None
    if isinstance(base, Mapping):
        base_sd = dict(base)
    else:
        with Source.open(base) as source:
            base_sd, model_config = source.load().state_dict, source.model_config
    require_data(base_sd)
    if isinstance(adapter, (str, os.PathLike)):
        with Source.open(adapter) as ad:
            plan = plan_adapter_merge(ad, base_sd, model_config=model_config, alpha=alpha, dtype=dtype)
    else:
        plan = plan_adapter_merge(adapter, base_sd, alpha=alpha, dtype=dtype)
    return plan.execute(plan.big)


def plan_adapter_merge(
    adapter: Source | Checkpoint | Mapping[str, Any],
    base: Mapping[str, torch.Tensor],
    *,
    model_config: Mapping[str, Any] | None = None,
    alpha: Alpha | None = None,
    dtype: DType | None = None,
    fan_in_fan_out: bool | None = None,
    kinds: Mapping[str, str] | None = None,
) -> MergePlan:
    """The checked plan of merging ``adapter`` into the standard state dict ``base`` (real or ``meta`` tensors).

    ``kinds`` settles modules of a non-PEFT adapter whose square shapes fit a linear module and an embedding
    alike (:func:`~lora_ckpt.detect_layout`), with what the adapter's file records
    (:meth:`~lora_ckpt.Checkpoint.detect`); a PEFT adapter's keys decide every kind, so there it may only agree.

    A PEFT adapter takes its scales from its config (``alpha`` is then an error) and each weight's orientation
    as PEFT loads it (:func:`~lora_ckpt.formats.peft.adapter_orientation`, from ``model_config``, the base
    model's ``config.json``); any other adapter takes ``alpha`` or the alpha it records.
    """
    dtype = as_dtype(dtype)
    if isinstance(adapter, Source) and adapter.kind == "peft":
        peft = load_peft_adapter(adapter)
        if alpha is not None:
            raise AlphaError(f"{adapter.path}: the alpha comes from adapter_config.json; do not pass alpha")
        if kinds:  # refused where it contradicts the keys, as every other kinds is
            detect_layout(peft.state_dict, kinds=kinds, layout=PEFT.name)  # type: ignore[arg-type]
        base, tied = _with_tied_aliases(base, peft.layout, model_config)
        plain = {split_prefix(k)[1]: v for k, v in base.items()}
        turned = adapter_orientation(peft, plain, model_config=model_config, given=fan_in_fan_out)
        plan = plan_merge(peft.state_dict, base=base, scales=peft.scales, layout=peft.layout, dtype=dtype,
                          fan_in_fan_out=turned)
        return _read_stored(plan, tied)
    ck = adapter.load() if isinstance(adapter, Source) else as_checkpoint(adapter)
    layout = ck.detect(kinds=kinds)
    base, tied = _with_tied_aliases(base, layout, model_config)
    plan = plan_merge(ck.state_dict, base=base, alpha=ck.resolve_alpha(alpha), dtype=dtype, layout=layout,
                      fan_in_fan_out=fan_in_fan_out)
    return _read_stored(plan, tied)


def _factors_of(step: Step | None, adapter: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale · left, right)`` with ``ΔW = left @ right`` in the standard orientation, float64; None: no update."""
    if step is None or step.module is None:
        return None
    f = module_factors(step.module, adapter, None, dtype=torch.float64)
    return f.left.double() * step.scale, f.right.double()


def _update_differs(a: Step | None, b: Step | None, adapter: Mapping[str, torch.Tensor]) -> bool:
    """Whether two steps' scaled updates differ (relative 1e-6), from the factors: ``||L1 R1 − L2 R2||`` via the
    Gram matrices of the stacked factors, never forming a (rows × cols) update."""
    fa, fb = _factors_of(a, adapter), _factors_of(b, adapter)
    if fa is None and fb is None:
        return False
    if fa is None or fb is None:
        return True
    left = torch.cat([fa[0], -fb[0]], dim=1)
    right = torch.cat([fa[1], fb[1]], dim=0)
    diff = ((left.T @ left) * (right @ right.T)).sum().clamp_min(0).sqrt()
    size = ((fa[0].T @ fa[0]) * (fa[1] @ fa[1].T)).sum().clamp_min(0).sqrt()
    return bool(diff > 1e-6 * size)


def _with_tied_aliases(base: Mapping[str, torch.Tensor], layout: Layout, model_config: Mapping[str, Any] | None
                       ) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """The base with each weight an adapter module updates, that the base model ties to a stored key and does not
    store itself (a tied ``lm_head``, left out by ``save_pretrained``), added as that key's tensor; and those
    aliases (alias -> stored key, without wrapper prefixes)."""
    stored = {split_prefix(k)[1]: k for k in base}
    missing = [f"{m.name}.weight" for m in layout.modules if m.has_factors and f"{m.name}.weight" not in stored]
    if not missing or model_config is None:
        return base, {}
    ties = tied_weights(model_config)
    used = {w: ties[w] for w in missing if ties.get(w) in stored}
    if not used:
        return base, {}
    with_aliases = dict(base)
    for alias, key in used.items():
        full = stored[key]
        with_aliases[full[: len(full) - len(key)] + alias] = base[full]
        log.info("%s: tied to %s in the base (config.json), which stores it once; merged with its own update and "
                 "written as its own key", alias, key)
    return with_aliases, used


def _read_stored(plan: MergePlan, tied: Mapping[str, str]) -> MergePlan:
    """The plan with each tied alias read from the key the base stores (what a streamed merge can read).

    Refuses when the alias and its key get different updates: the output's ``config.json`` (the base's) ties them,
    so a model loading it would keep one of the two and compute something else.
    """
    if not tied:
        return plan
    merges = {split_prefix(s.key)[1]: s for s in plan.steps if s.op == "merge"}
    for alias, key in tied.items():
        if _update_differs(merges.get(alias), merges.get(key), plan.adapter):
            raise TiedWeightError(
                f"{alias}: the base model ties it to {key} (its config.json), but the adapter gives the two different "
                "updates, so no tied model computes what the adapter does, and a merged model folder that ties them "
                f"would drop one update; leave {alias.removesuffix('.weight')} out of the adapter, or merge into a "
                "model whose config unties them (tie_word_embeddings=False)"
            )
    steps = [replace(s, source=tied[s.source]) if s.source is not None and s.source in tied and not s.from_adapter
             else s for s in plan.steps]
    return replace(plan, steps=steps)
