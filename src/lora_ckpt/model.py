"""The live-model adapter: load any checkpoint into any nanoGPT-style model, and merge a live LoRA model.

Works on modules following the nanoGPT LoRA convention (``LoRALinear``/``LoRAEmbedding`` with
``main_weight``, ``lora_A``, ``lora_B`` and ``rank``/``alpha`` attributes), compiled or DDP-wrapped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from lora_ckpt.convert import LoadReport, convert_state_dict
from lora_ckpt.errors import KeyMismatchError, TiedWeightError
from lora_ckpt.io import Checkpoint, PathLike, as_checkpoint
from lora_ckpt.layout import detect_layout, matches_any
from lora_ckpt.merge import Alpha, merge_lora

__all__ = ["load_into", "merged_state_dict", "module_alphas", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def module_alphas(model: nn.Module) -> dict[str, float]:
    """Return ``{module name: alpha}`` for each LoRA module of ``model`` that has factors."""
    out: dict[str, float] = {}
    for name, mod in unwrap(model).named_modules():
        if isinstance(getattr(mod, "lora_A", None), nn.Module) and hasattr(mod, "alpha"):
            out[name] = float(mod.alpha)
    return out


def merged_state_dict(
    model: nn.Module,
    *,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
    tied: Literal["untie", "tie"] = "untie",
) -> dict[str, torch.Tensor]:
    """Return the deployable standard state dict of a live LoRA model, without changing the model.

    Alphas come from the modules' ``alpha`` attributes. Sharp edge: entries that need no merge share
    memory with the model when ``device`` is the model's own (as ``state_dict()`` does); merged
    weights are new tensors. See :func:`~lora_ckpt.merge_lora` for ``tied`` and ``dtype``.

    Example:
        >>> from lora_ckpt.testing import make_gpt, make_tokens
        >>> lora = make_gpt(attn_rank=4, randomize=True)
        >>> plain = make_gpt()
        >>> _ = plain.load_state_dict(merged_state_dict(lora))
        >>> torch.testing.assert_close(plain(make_tokens()), lora(make_tokens()))
    """
    inner = unwrap(model)
    with torch.no_grad():
        sd = inner.state_dict()
        layout = detect_layout(sd)
        out = merge_lora(sd, alpha=module_alphas(inner), tied=tied, dtype=dtype, layout=layout) if layout.is_lora else dict(sd)
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
    return out


def load_into(
    model: nn.Module,
    checkpoint: Checkpoint | Mapping[str, Any] | PathLike,
    *,
    alpha: Alpha | None = None,
    ignore: Iterable[str] = (),
    tied: Literal["error", "untie", "tie"] = "error",
) -> LoadReport:
    """Load ``checkpoint`` into ``model`` whatever their layouts; return what was done, key by key.

    Standard -> LoRA remaps base weights into ``main_weight`` (adapters keep their initialisation);
    LoRA -> standard merges; LoRA -> LoRA copies a module exactly where rank and alpha match and
    otherwise merges the checkpoint's update into ``main_weight``, leaving the model's fresh factors.
    Strict: every model key except LoRA factors must be supplied and every checkpoint key used,
    unless it matches a glob in ``ignore``. Nothing is loaded unless everything checks out.

    Sharp edge, tied parameters: when the values for parameters the model ties (``wte`` and
    ``lm_head``) differ, as after merging an embedding update, loading raises unless ``tied`` says
    what to do: ``"untie"`` gives each key its own parameter (exact function), ``"tie"`` loads the
    merged weight into the shared parameter (the other key's function changes).

    Args:
        model: a standard or LoRA nanoGPT-style model, compiled or DDP-wrapped or not.
        checkpoint: a file path, a nanoGPT checkpoint dict, a state dict or a :class:`Checkpoint`.
        alpha: the checkpoint's LoRA alpha; recorded values (file metadata, ``model_args``) are used
            when omitted, and a value that contradicts them is an error.
        ignore: glob patterns of keys (without prefix) that need not be used or supplied.
        tied: ``"error"``, ``"untie"`` or ``"tie"``, see above.

    Raises:
        KeyMismatchError, ShapeError, AlphaError, TiedWeightError, LayoutError, CheckpointFileError.

    Example:
        >>> from lora_ckpt.testing import make_gpt
        >>> report = load_into(make_gpt(attn_rank=8), make_gpt().state_dict())
        >>> len(report.remapped), len(report.initialised)
        (4, 4)
    """
    if tied not in ("error", "untie", "tie"):
        raise ValueError(f"tied must be 'error', 'untie' or 'tie', got {tied!r}")
    inner = unwrap(model)
    ignore = tuple(ignore)
    model_sd = inner.state_dict()
    conversion = convert_state_dict(
        as_checkpoint(checkpoint), model_sd, alpha=alpha, target_alpha=module_alphas(inner), ignore=ignore
    )
    values, sources, report = conversion.values, conversion.sources, conversion.report
    untie = _resolve_ties(inner, values, sources, tied, report)
    with torch.no_grad():
        for key in untie:
            _give_own_parameter(inner, key)
        result = inner.load_state_dict(values, strict=False)
    unexpected_missing = [k for k in result.missing_keys if k not in report.initialised and not matches_any(k, ignore)]
    if result.unexpected_keys or unexpected_missing:  # pragma: no cover - _check_strict covers these
        raise KeyMismatchError(f"load_state_dict disagreed: missing {unexpected_missing}, unexpected {result.unexpected_keys}")
    return report


def _resolve_ties(
    model: nn.Module,
    values: dict[str, torch.Tensor],
    sources: Mapping[str, str],
    tied: str,
    report: LoadReport,
) -> list[str]:
    """Check tied model parameters receive one value; return the keys to untie."""
    to_untie: list[str] = []
    for group in _model_ties(model):
        given = [k for k in group if k in values]
        if len(given) < 2 or all(_same(values[given[0]], values[k]) for k in given[1:]):
            continue
        merged = [k for k in given if sources.get(k) == "merge"]
        if tied == "untie":
            keep = merged[0] if merged else given[0]
            to_untie += [k for k in given if k != keep]
            report.untied += [k for k in given if k != keep]
            report.notes.append(f"untied {' = '.join(given)}: each keeps its own value (exact function)")
        elif tied == "tie" and len(merged) == 1:
            for k in given:
                values[k] = values[merged[0]]
            report.notes.append(f"tied {' = '.join(given)} to the merged {merged[0]}")
        else:
            reason = (
                f"the LoRA update merged into {merged[0]} would be lost, or leak into "
                f"{', '.join(k for k in given if k != merged[0])}"
                if len(merged) == 1
                else "the checkpoint holds different values for them"
            )
            choices = (
                "tied='untie' (give each key its own parameter: the model computes exactly what the checkpoint did) "
                "or tied='tie' (load the merged weight into the shared parameter: the tied head changes too)"
                if len(merged) == 1
                else "tied='untie' (give each key its own parameter)"
            )
            raise TiedWeightError(f"the model ties {' = '.join(given)}, but {reason}; choose {choices}")
    return to_untie


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _model_ties(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _give_own_parameter(model: nn.Module, key: str) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
