"""The live-model adapter: load any checkpoint into any nanoGPT-style model, and merge a live LoRA model.

Works on modules following the nanoGPT LoRA convention (``LoRALinear``/``LoRAEmbedding`` with
``main_weight``, ``lora_A``, ``lora_B`` and ``rank``/``alpha`` attributes), compiled or DDP-wrapped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from lora_ckpt.dtypes import DType, as_dtype
from lora_ckpt.convert import LoadReport, convert_state_dict, same_value
from lora_ckpt.distributed import ShardedState, ranks_agree
from lora_ckpt.checks import check_alpha
from lora_ckpt.errors import AlphaError, KeyMismatchError, TiedWeightError
from lora_ckpt.io import Checkpoint, PathLike, as_checkpoint
from lora_ckpt.layout import Layout, detect_layout, matches_any
from lora_ckpt.merge import Alpha, merge_lora, resolve_scales

__all__ = ["load_into", "merged_state_dict", "module_alphas", "module_scales", "unwrap"]


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
    """Return ``{module name: alpha}`` for each LoRA module of ``model`` that has factors and records its scale.

    The scale is read from the module: ``alpha`` or ``lora_alpha`` (divided by the rank), ``scaling`` (a
    number, or PEFT's per-adapter dict). Module names are those :func:`~lora_ckpt.detect_layout` gives.
    """
    inner = unwrap(model)
    sd = inner.state_dict()
    layout = detect_layout(sd)
    return {name: scale * layout.module(name).rank for name, scale in module_scales(inner, layout).items()}


def module_scales(model: nn.Module, layout: Layout) -> dict[str, float]:
    """``{module name: scale}`` for the LoRA modules of ``layout`` whose live module records its scale."""
    live = dict(unwrap(model).named_modules())
    prefix = layout.spec.key_prefix if layout.spec is not None else ""
    out: dict[str, float] = {}
    for m in layout.modules:
        if not m.has_factors:
            continue
        mod = live.get(m.name) or live.get(prefix + m.name)
        scale = _scale_of(mod, m.name, m.rank) if mod is not None else None
        if scale is not None:
            out[m.name] = scale
    return out


def _scale_of(mod: nn.Module, name: str, rank: int) -> float | None:
    fix = "pass alpha=... to say what it is"
    scaling = getattr(mod, "scaling", None)
    if isinstance(scaling, Mapping):  # PEFT's LoraLayer: {adapter name: scale}
        if len(scaling) != 1:
            raise AlphaError(f"{name}: the module holds adapters {sorted(scaling)}; merge with one adapter active")
        return check_alpha(next(iter(scaling.values())), where=f"{name}.scaling", fix=fix)
    said: dict[str, float] = {}
    for attr in ("alpha", "lora_alpha"):
        value = getattr(mod, attr, None)
        if value is not None:
            said[attr] = check_alpha(value.item() if isinstance(value, torch.Tensor) else value,
                                     where=f"{name}.{attr}", fix=fix) / rank
    if scaling is not None:
        said["scaling"] = check_alpha(scaling.item() if isinstance(scaling, torch.Tensor) else scaling,
                                      where=f"{name}.scaling", fix=fix)
    if len({round(v, 12) for v in said.values()}) > 1:
        shown = ", ".join(f"{k} gives {v:g}" for k, v in said.items())
        raise AlphaError(f"{name}: the module records scales that disagree ({shown}; alpha counts as alpha / rank "
                         f"{rank}); pass alpha=... to say which one its forward uses")
    return next(iter(said.values()), None)


def _live_orientation(model: nn.Module, layout: Layout) -> dict[str, bool] | None:
    """Per module, whether its base is stored (in, out), as PEFT's layers record it for their own type
    (``Conv1D`` or ``nn.Linear``); None where no module says."""
    live = dict(unwrap(model).named_modules())
    prefix = layout.spec.key_prefix if layout.spec is not None else ""
    said: dict[str, bool] = {}
    for m in layout.modules:
        mod = live.get(m.name) or live.get(prefix + m.name)
        if mod is not None and isinstance(getattr(mod, "fan_in_fan_out", None), bool):
            said[m.name] = bool(mod.fan_in_fan_out)
    return said or None


def merged_state_dict(
    model: nn.Module,
    *,
    alpha: Alpha | None = None,
    device: torch.device | str | None = "cpu",
    dtype: DType | None = None,
    tied: Literal["untie", "tie"] = "untie",
) -> dict[str, torch.Tensor]:
    """Return the deployable standard state dict of a live LoRA model, without changing the model.

    Scales come from the modules (``alpha``, ``lora_alpha`` or ``scaling`` attributes, PEFT's
    ``scaling`` dicts); ``alpha`` (one float or per module) is for modules that record none, and an
    ``alpha`` that contradicts a recorded one is an error. A model whose parameters are DTensors (FSDP2,
    tensor parallel) is merged shard by shard on every rank (a collective), into DTensors placed like its
    base weights (``device`` does not apply to them). PEFT layers also say how their base is stored
    (``fan_in_fan_out``). Sharp edge: entries that need no merge share memory with the model when
    ``device`` is the model's own (as ``state_dict()`` does); merged weights are new tensors. See
    :func:`~lora_ckpt.merge_lora` for ``tied`` and ``dtype``.

    Raises:
        AlphaError: a module's scale is neither recorded nor given, or the two disagree.

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
        # FSDP2 / tensor parallel: merged on each rank's shards, the arguments first agreed across the ranks
        shards = ShardedState.of(sd, settings={"alpha": alpha, "dtype": dtype, "tied": tied})
        dtype = as_dtype(dtype)
        layout = shards.layout() if shards is not None else detect_layout(sd)
        if not layout.is_lora:
            out = dict(sd)
        else:
            with ranks_agree(shards):  # a refusal on one rank is raised on every rank: none waits in a collective
                scales = _scales(layout, module_scales(inner, layout), alpha)
                fan_in_fan_out = _live_orientation(inner, layout)
            out = (shards.merge(layout, scales=scales, tied=tied, dtype=dtype, fan_in_fan_out=fan_in_fan_out)
                   if shards is not None else merge_lora(sd, scales=scales, tied=tied, dtype=dtype, layout=layout,
                                                         fan_in_fan_out=fan_in_fan_out))
        if device is not None and shards is None:
            out = {k: v.to(device) for k, v in out.items()}
    return out


def _scales(layout: Layout, recorded: Mapping[str, float], alpha: Alpha | None) -> dict[str, float]:
    """Every module's scale: recorded by the module, else from ``alpha``; raise where neither or they disagree."""
    given = resolve_scales(layout, alpha) if alpha is not None else {}
    clash = [n for n in recorded if n in given and not math.isclose(given[n], recorded[n], rel_tol=1e-6)]
    if clash:
        raise AlphaError(f"alpha={alpha} gives {clash[0]} the scale {given[clash[0]]:g}, but the module records "
                         f"{recorded[clash[0]]:g}; drop alpha to use the recorded scales")
    out = {**given, **recorded}
    missing = [m.name for m in layout.modules if m.has_factors and m.name not in out]
    if missing:
        raise AlphaError(
            f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}: the module records no alpha (as alpha, "
            "lora_alpha or scaling); pass alpha=<float> or a per-module mapping"
        )
    return out


def load_into(
    model: nn.Module,
    checkpoint: Checkpoint | Mapping[str, Any] | PathLike,
    *,
    alpha: Alpha | None = None,
    model_alpha: Alpha | None = None,
    ignore: Iterable[str] = (),
    tied: Literal["error", "untie", "tie"] = "error",
) -> LoadReport:
    """Load ``checkpoint`` into ``model`` whatever their layouts; return what was done, key by key.

    Standard -> LoRA remaps base weights into ``main_weight`` (adapters keep their initialisation);
    LoRA -> standard merges; LoRA -> LoRA copies a module exactly where rank and alpha match and
    otherwise merges the checkpoint's update into ``main_weight``, leaving the model's fresh factors.
    Strict: every model key except LoRA factors must be supplied and every checkpoint key used,
    unless it matches a glob in ``ignore``. Nothing is loaded unless everything checks out. On a model
    whose parameters are DTensors (FSDP2, tensor parallel) each rank reads and loads only its own blocks.

    Sharp edge, tied parameters: when the values for parameters the model ties (``wte`` and
    ``lm_head``) differ, as after merging an embedding update, loading raises unless ``tied`` says
    what to do: ``"untie"`` gives each key its own parameter (exact function), ``"tie"`` loads the
    merged weight into the shared parameter (the other key's function changes).

    Args:
        model: a standard or LoRA nanoGPT-style model, compiled or DDP-wrapped or not.
        checkpoint: a file path, a nanoGPT checkpoint dict, a state dict or a :class:`Checkpoint`.
        alpha: the checkpoint's LoRA alpha; recorded values (file metadata, ``model_args``) are used
            when omitted, and a value that contradicts them is an error.
        model_alpha: the model's own alpha (float or per module) for LoRA modules that record none (as
            ``alpha``, ``lora_alpha`` or ``scaling``); without it such a module is an error, never a silent
            reset of its trained factors.
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
    inner = unwrap(model)
    ignore = tuple(ignore)
    model_sd = inner.state_dict()
    # FSDP2 / tensor parallel: each rank reads and loads its own blocks, the arguments first agreed across the ranks
    shards = ShardedState.of(model_sd, settings={"checkpoint": checkpoint, "alpha": alpha, "model_alpha": model_alpha,
                                                 "ignore": ignore, "tied": tied})
    if tied not in ("error", "untie", "tie"):
        raise ValueError(f"tied must be 'error', 'untie' or 'tie', got {tied!r}")
    model_layout = shards.layout() if shards is not None else detect_layout(model_sd)
    with ranks_agree(shards):  # a refusal on one rank is raised on every rank: none waits in a collective
        recorded = {n: sc * model_layout.module(n).rank for n, sc in module_scales(inner, model_layout).items()}
        if model_alpha is not None:
            given = model_alpha if isinstance(model_alpha, Mapping) else {
                m.name: float(model_alpha) for m in model_layout.modules if m.has_factors}
            recorded = {**{k: check_alpha(v, where=f"model_alpha[{k!r}]", fix="pass finite numbers")
                           for k, v in given.items()}, **recorded}
    if shards is not None:
        conversion = shards.convert(checkpoint, model_layout, alpha=alpha, target_alpha=recorded, ignore=ignore)
    else:
        conversion = convert_state_dict(
            as_checkpoint(checkpoint), model_layout, alpha=alpha, target_alpha=recorded, ignore=ignore,
            keep_factors=True
        )
    values, sources, report = conversion.values, conversion.sources, conversion.report
    by_key = model_layout.module_by_key
    for key in report.initialised:  # a module the checkpoint cannot fill starts fresh: a zero update, whatever it held
        m = by_key[key]
        if key == m.b_key and m.has_base:
            values[key] = torch.zeros_like(model_sd[model_layout.prefix + key])
    untie = _resolve_ties(inner, values, sources, tied, report, sharded=shards is not None)
    if untie and shards is not None:
        raise TiedWeightError(f"{', '.join(untie)}: tied to another key, and a sharded model's parameters cannot be "
                              "untied after fully_shard; untie them before sharding, or pass tied='tie'")
    with torch.no_grad():
        for key in untie:
            _give_own_parameter(inner, key)
        result = inner.load_state_dict(values, strict=False)
    fresh = set(report.initialised)
    unexpected_missing = [k for k in result.missing_keys if k not in fresh and not matches_any(k, ignore)]
    if result.unexpected_keys or unexpected_missing:  # pragma: no cover - _check_strict covers these
        raise KeyMismatchError(f"load_state_dict disagreed: missing {unexpected_missing}, unexpected {result.unexpected_keys}")
    return report


def _resolve_ties(
    model: nn.Module,
    values: dict[str, torch.Tensor],
    sources: Mapping[str, str],
    tied: str,
    report: LoadReport,
    *,
    sharded: bool = False,
) -> list[str]:
    """Check tied model parameters receive one value; return the keys to untie."""
    to_untie: list[str] = []
    for group in _model_ties(model):
        given = [k for k in group if k in values]
        if len(given) < 2 or all(same_value(values[given[0]], values[k]) for k in given[1:]):
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
            untie = ("untie them in the model before fully_shard, then pass tied='untie' (a sharded model's parameters "
                     "cannot be untied afterwards)" if sharded else "tied='untie' (give each key its own parameter")
            choices = (
                f"{untie}{'' if sharded else ': the model computes exactly what the checkpoint did)'} or tied='tie' "
                "(load the merged weight into the shared parameter: the tied head changes too)"
                if len(merged) == 1
                else untie + ("" if sharded else ")")
            )
            raise TiedWeightError(f"the model ties {' = '.join(given)}, but {reason}; choose {choices}")
    return to_untie


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
