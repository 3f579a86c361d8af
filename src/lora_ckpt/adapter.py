"""Merging an adapter file or folder into a base model's weights (PEFT folders, kohya, any LoRA file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from lora_ckpt.dtypes import DType, as_dtype
from lora_ckpt.errors import AlphaError
from lora_ckpt.formats.peft import adapter_orientation, load_peft_adapter
from lora_ckpt.io import Checkpoint, PathLike, as_checkpoint
from lora_ckpt.layout import split_prefix
from lora_ckpt.merge import Alpha, MergePlan, plan_merge, require_data
from lora_ckpt.source import Source

__all__ = ["merge_adapter", "plan_adapter_merge"]


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
) -> MergePlan:
    """The checked plan of merging ``adapter`` into the standard state dict ``base`` (real or ``meta`` tensors).

    A PEFT adapter takes its scales from its config (``alpha`` is then an error) and each weight's orientation
    as PEFT loads it (:func:`~lora_ckpt.formats.peft.adapter_orientation`, from ``model_config``, the base
    model's ``config.json``); any other adapter takes ``alpha`` or the alpha it records.
    """
    dtype = as_dtype(dtype)
    if isinstance(adapter, Source) and adapter.kind == "peft":
        peft = load_peft_adapter(adapter)
        if alpha is not None:
            raise AlphaError(f"{adapter.path}: the alpha comes from adapter_config.json; do not pass alpha")
        plain = {split_prefix(k)[1]: v for k, v in base.items()}
        turned = adapter_orientation(peft, plain, model_config=model_config, given=fan_in_fan_out)
        return plan_merge(peft.state_dict, base=base, scales=peft.scales, layout=peft.layout, dtype=dtype,
                          fan_in_fan_out=turned)
    ck = adapter.load() if isinstance(adapter, Source) else as_checkpoint(adapter)
    return plan_merge(ck.state_dict, base=base, alpha=ck.resolve_alpha(alpha), dtype=dtype,
                      fan_in_fan_out=fan_in_fan_out)
