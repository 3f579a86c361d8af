"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Reads the scale of every module the way PEFT computes it (``lora_alpha / r``, ``/ sqrt(r)`` with
rsLoRA, per-module ``rank_pattern`` / ``alpha_pattern``) and writes folders PEFT loads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_ckpt.checks import Patterns, check_alpha, check_rank
from lora_ckpt.errors import AlphaError, CheckpointFileError, LayoutError, ShapeError, brief
from lora_ckpt.io import write_checkpoint
from lora_ckpt.formats.hf import module_types
from lora_ckpt.layout import PEFT, Layout, detect_layout
from lora_ckpt.merge import orientation
from lora_ckpt.output import Output, PathLike
from lora_ckpt.source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Source

__all__ = ["PeftAdapter", "PeftConfig", "adapter_orientation", "is_peft_dir", "load_peft_adapter", "pattern_key", "peft_config", "save_peft_adapter",
           "write_peft_adapter"]

CONFIG_NAME = ADAPTER_CONFIG
WEIGHT_NAMES = ADAPTER_WEIGHTS


@dataclass(frozen=True)
class PeftConfig:
    """A PEFT LoRA ``adapter_config.json``, validated: every field PEFT obeys when it loads an adapter, or refused.

    Read with :meth:`read`; :meth:`selects` says whether PEFT would put LoRA on a module (``target_modules``,
    ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``, ``modules_to_save``), :meth:`scales`
    gives PEFT's scaling per module (``lora_alpha / r``, ``/ sqrt(r)`` with rsLoRA, the patterns).
    """

    raw: dict[str, Any]
    where: str
    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    use_dora: bool
    lora_bias: bool
    fan_in_fan_out: bool
    target_modules: str | list[str] | None
    exclude_modules: str | list[str] | None
    layers_to_transform: int | list[int] | None
    layers_pattern: list[str] | None
    modules_to_save: list[str]
    task_type: str | None
    base_model_name_or_path: str | None = None

    @classmethod
    def read(cls, raw: Mapping[str, Any], *, where: object) -> PeftConfig:
        """Validate ``raw`` (the parsed JSON); raise naming the field and the file."""
        w = str(where)
        _check_supported(raw, w)
        if raw.get("r") is None or raw.get("lora_alpha") is None:
            raise AlphaError(f"{w}: the PEFT config has no 'r' or 'lora_alpha'; it cannot say how to scale the update")
        fix = "fix adapter_config.json"
        r = check_rank(raw["r"], where=f"{w}: r")
        alpha = check_alpha(raw["lora_alpha"], where=f"{w}: lora_alpha", fix=fix)
        ranks = {k: check_rank(v, where=f"{w}: rank_pattern[{k!r}]") for k, v in _mapping(raw, "rank_pattern", w).items()}
        alphas = {k: check_alpha(v, where=f"{w}: alpha_pattern[{k!r}]", fix=fix)
                  for k, v in _mapping(raw, "alpha_pattern", w).items()}
        layers = raw.get("layers_to_transform")
        if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
            raise LayoutError(f"{w}: layers_to_transform is {layers!r}, not an integer or a list of integers")
        pattern = raw.get("layers_pattern")
        return cls(
            dict(raw), w, r, alpha, ranks, alphas,
            _flag(raw, "use_rslora", w), _flag(raw, "use_dora", w), _flag(raw, "lora_bias", w),
            _flag(raw, "fan_in_fan_out", w),
            _names(raw, "target_modules", w, single=True), _names(raw, "exclude_modules", w, single=True),
            layers, [pattern] if isinstance(pattern, str) else _names(raw, "layers_pattern", w, single=False),  # type: ignore[arg-type]
            _names(raw, "modules_to_save", w, single=False) or [],  # type: ignore[arg-type]
            _optional_str(raw, "task_type", w), _optional_str(raw, "base_model_name_or_path", w),
        )

    def base_model(self) -> str:
        """The base model this adapter names (``base_model_name_or_path``: a folder or a Hub id), as PEFT's
        ``AutoPeftModel`` resolves it; raises where the config names none."""
        if not self.base_model_name_or_path:
            raise LayoutError(
                f"{self.where}: names no base_model_name_or_path, so the adapter alone cannot be merged; give the "
                "base model too: lora-ckpt merge BASE ADAPTER DST (Python: merge_files(BASE, DST, adapter=ADAPTER))"
            )
        return self.base_model_name_or_path

    def selects(self, names: list[str]) -> dict[str, bool]:
        """Whether PEFT puts LoRA on each module ``name`` (the base model's module names), as PEFT decides it."""
        all_patterns = [p for field in ("target_modules", "exclude_modules") for p in _as_list(getattr(self, field))
                        if isinstance(getattr(self, field), str)]
        patterns = Patterns("target_modules/exclude_modules", all_patterns, where=self.where)
        layer_patterns = Patterns("layers_pattern", list(self.layers_pattern or []), where=self.where)
        save = Patterns("modules_to_save", list(self.modules_to_save), where=self.where)
        try:
            return patterns.run(lambda: {n: self._selects(n, patterns, layer_patterns, save) for n in names})
        except (re.error, RecursionError) as e:  # a pattern valid alone, not inside PEFT's own wrapping
            raise LayoutError(f"{self.where}: the pattern {brief(patterns.current)} cannot be matched as PEFT "
                              f"matches it ({e}); simplify it") from None

    def _selects(self, name: str, patterns: Patterns, layer_patterns: Patterns, save: Patterns) -> bool:
        ex = self.exclude_modules
        if isinstance(ex, str) and patterns.fullmatch(ex, name):
            return False
        if isinstance(ex, list) and (name in ex or any(name.endswith(f".{e}") for e in ex)):
            return False
        for m in self.modules_to_save:
            save.current = m
            if re.match(rf"(^|.*\.){m}($|\..*)", name):
                return False
        target = self.target_modules
        if target is None:
            return False
        if isinstance(target, str):
            return target == "all-linear" or patterns.fullmatch(target, name)
        if name in target:
            return True
        if not any(name.endswith(f".{t}") for t in target):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        index = None
        if not self.layers_pattern:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            found = None
            for p in self.layers_pattern:
                layer_patterns.current = p
                found = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
                if found is not None:
                    break
        if found is not None:
            index = int(found.group("idx"))
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers

    def scales(self, layout: Layout) -> dict[str, float]:
        """PEFT's scaling for each module with factors; raise where the config and the tensors disagree."""
        ranks = Patterns("rank_pattern", list(self.rank_pattern), where=self.where)
        alphas = Patterns("alpha_pattern", list(self.alpha_pattern), where=self.where)
        out: dict[str, float] = {}
        problems: list[str] = []
        ambiguous: list[str] = []

        def resolve() -> None:
            for m in layout.modules:
                if not m.has_factors:
                    continue
                rks, aks = ranks.suffixes(m.name), alphas.suffixes(m.name)
                for option, keys, values in (("rank_pattern", rks, self.rank_pattern),
                                             ("alpha_pattern", aks, self.alpha_pattern)):
                    if len({values[k] for k in keys}) > 1:  # PEFT saves patterns sorted: which one trained is lost
                        ambiguous.append(f"{m.name} matches {option} entries {keys} with different values "
                                         f"{[values[k] for k in keys]}")
                rk, ak = (rks[0] if rks else None), (aks[0] if aks else None)
                r = self.rank_pattern[rk] if rk is not None else self.r
                alpha = self.alpha_pattern[ak] if ak is not None else self.lora_alpha
                if r != m.rank:
                    problems.append(f"{m.name}: the config says rank {r}, the tensors have rank {m.rank}")
                out[m.name] = alpha / math.sqrt(m.rank) if self.use_rslora else alpha / m.rank

        ranks.run(lambda: alphas.run(resolve))
        if ambiguous:
            raise LayoutError(f"{self.where}: " + "; ".join(ambiguous[:3]) + "; PEFT writes its patterns sorted, so "
                              "which one applied in training cannot be told: keep one pattern per module")
        if problems:
            raise ShapeError("; ".join(problems) + f"; is {self.where} the adapter's own config?")
        return out

    def check_tensors(self, layout: Layout) -> None:
        """Raise unless the tensors are what this config makes PEFT load: every module with factors selected,
        DoRA magnitudes exactly where ``use_dora``, ``lora_B`` biases only with ``lora_bias``."""
        with_factors = [m for m in layout.modules if m.has_factors]
        chosen = self.selects([m.name for m in with_factors])
        problems: list[str] = []
        unselected = [m.name for m in with_factors if not chosen[m.name]]
        if unselected:
            problems.append(
                f"{_few(unselected)} {'has' if len(unselected) == 1 else 'have'} LoRA factors, but the config's "
                f"target_modules={self.target_modules!r}"
                + (f", exclude_modules={self.exclude_modules!r}" if self.exclude_modules else "")
                + (f", layers_to_transform={self.layers_to_transform!r}" if self.layers_to_transform is not None else "")
                + (f", modules_to_save={self.modules_to_save!r}" if self.modules_to_save else "")
                + " do not select them, so PEFT would not load them"
            )
        dora = [m.name for m in with_factors if m.is_dora]
        if dora and not self.use_dora:
            problems.append(f"{_few(dora)} carry DoRA magnitudes, but the config says use_dora=false")
        plain = [m.name for m in with_factors if not m.is_dora]
        if self.use_dora and plain:
            problems.append(f"the config says use_dora=true, but {_few(plain)} have no DoRA magnitude")
        biased = [m.name for m in with_factors if "b_bias" in m.key_map]
        if biased and not self.lora_bias:
            problems.append(f"{_few(biased)} carry lora_B biases, but the config says lora_bias=false")
        if problems:
            raise LayoutError(f"{self.where}: " + "; ".join(problems)
                              + "; the config and the tensors disagree: fix adapter_config.json or the tensors")


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_list(v: object) -> list[str]:
    return [v] if isinstance(v, str) else list(v) if isinstance(v, list) else []  # type: ignore[arg-type]


def _mapping(raw: Mapping[str, Any], field: str, where: str) -> dict[str, Any]:
    value = raw.get(field) or {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise LayoutError(f"{where}: {field} is {value!r}, not an object of pattern -> value")
    return dict(value)


def _flag(raw: Mapping[str, Any], field: str, where: str) -> bool:
    value = raw.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise LayoutError(f"{where}: {field} is {value!r}, not true or false")
    return value


def _names(raw: Mapping[str, Any], field: str, where: str, *, single: bool) -> str | list[str] | None:
    value = raw.get(field)
    if value is None or (single and isinstance(value, str)):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise LayoutError(f"{where}: {field} is {value!r}, not {'a pattern or ' if single else ''}a list of names")


def _optional_str(raw: Mapping[str, Any], field: str, where: str) -> str | None:
    value = raw.get(field)
    if value is not None and not isinstance(value, str):
        raise LayoutError(f"{where}: {field} is {value!r}, not a string")
    return value


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter: its tensors (PEFT's saved keys), its config and the layout found in them."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    layout: Layout
    path: Path | None = None
    scales: dict[str, float] = field(default_factory=dict)
    settings: PeftConfig | None = None

    @property
    def fan_in_fan_out(self) -> bool:
        return self.settings.fan_in_fan_out if self.settings is not None else bool(self.config.get("fan_in_fan_out"))

    def __repr__(self) -> str:
        return (f"PeftAdapter(path={str(self.path) if self.path else None!r}, tensors={len(self.state_dict)}, "
                f"modules={len(self.scales)}, r={self.config.get('r')!r}, lora_alpha={self.config.get('lora_alpha')!r})")


def adapter_orientation(
    adapter: PeftAdapter,
    base: Mapping[str, torch.Tensor],
    *,
    model_config: Mapping[str, Any] | None = None,
    given: bool | None = None,
) -> dict[str, bool]:
    """Per module, whether its base weight is stored (in, out), decided as PEFT decides it when it loads the adapter.

    PEFT follows each layer's type (``Conv1D`` or ``nn.Linear``), whatever ``fan_in_fan_out`` says (it even
    rewrites the saved value), so the config cannot decide a square weight. Where the base model's
    ``config.json`` names its type, that decides every module. Otherwise a non-square weight shows its own
    orientation, and a square one is (in, out) when all non-square weights are (GPT-2's Conv1D family), or as
    ``given`` says; anything else is refused. ``given`` (an argument) must agree with the facts.
    """
    linear = [m for m in adapter.layout.modules if m.has_factors and m.kind == "linear"]
    types = module_types(model_config, [m.name for m in linear])
    if types is not None:
        if given is not None and any(v != given for v in types.values()):
            wrong = next(n for n, v in types.items() if v != given)
            raise LayoutError(f"fan_in_fan_out={given} contradicts the base model's type: {wrong} is stored "
                              f"{'(in, out)' if types[wrong] else '(out, in)'}; drop the argument")
        return types
    shown: dict[str, bool] = {}
    for m in linear:
        weight = base.get(f"{m.name}.weight")
        if weight is not None and m.delta_shape[0] != m.delta_shape[1]:
            shown[m.name] = orientation(m, weight, None)
    votes = set(shown.values())
    if given is not None and votes and votes != {given}:
        raise LayoutError(f"fan_in_fan_out={given} contradicts the weights' shapes; drop the argument")
    out = dict(shown)
    settled = given if given is not None else True if votes == {True} else None
    for m in linear:
        if m.name in out or m.delta_shape[0] != m.delta_shape[1]:
            continue  # shown by its shape, or a weight the base lacks (the merge names it)
        if settled is None:
            raise LayoutError(
                f"{m.name}: a square weight, stored (out, in) by nn.Linear or (in, out) by GPT-2's Conv1D, and nothing "
                "here tells which (PEFT decides by the layer's type, not by fan_in_fan_out); give the model as its "
                "folder, whose config.json names the type, or pass fan_in_fan_out=True (CLI: --fan-in-fan-out) "
                "for Conv1D or fan_in_fan_out=False (CLI: --no-fan-in-fan-out) for nn.Linear"
            )
        out[m.name] = settled
    return out


def is_peft_dir(path: PathLike) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter config."""
    return (Path(path) / CONFIG_NAME).is_file()


def pattern_key(patterns: list[str], name: str) -> str | None:
    """The first pattern (in order) whose regex matches the end of ``name`` at a component boundary."""
    matcher = Patterns("pattern", patterns, where="patterns")
    return matcher.run(lambda: matcher.suffix(name))


def peft_scales(config: Mapping[str, Any], layout: Layout) -> dict[str, float]:
    """Return PEFT's scaling for each module with factors; raise where the config disagrees with the tensors."""
    return PeftConfig.read(config, where="the PEFT config").scales(layout)


def _check_supported(config: Mapping[str, Any], where: str) -> None:
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise LayoutError(f"{where}: peft_type {kind!r} is not LoRA; lora_ckpt merges LoRA adapters only")
    if config.get("target_parameters"):
        raise LayoutError(
            f"{where}: target_parameters {config['target_parameters']} (LoRA on raw parameters, e.g. MoE experts) "
            "is not supported"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise LayoutError(
            f"{where}: init_lora_weights={init!r} trains the adapter against a changed base (its residual), so merging "
            "it into the original base weights gives another model; convert it to a plain LoRA adapter with PEFT "
            "first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for option in ("use_qalora", "layer_replication", "trainable_token_indices", "alora_invocation_tokens"):
        if config.get(option):
            raise LayoutError(f"{where}: PEFT option {option}={config[option]!r} is not supported")


def load_peft_adapter(path: PathLike | Source) -> PeftAdapter:
    """Return the PEFT adapter stored in the folder ``path`` (config read, scales resolved, shapes checked).

    Raises:
        CheckpointFileError: no config or no weights file, or an unreadable one.
        LayoutError: not a LoRA adapter, or an unsupported variant (named).
        ShapeError, AlphaError: config and tensors disagree.
    """
    if isinstance(path, Source):
        return _adapter(path)
    with Source.open(path) as source:
        return _adapter(source)


def _adapter(source: Source) -> PeftAdapter:
    if source.kind != "peft" or source.config is None:
        raise CheckpointFileError(f"{source.path}: not a PEFT adapter folder (no {CONFIG_NAME})")
    settings = PeftConfig.read(source.config, where=source.path / CONFIG_NAME)
    sd = source.load().state_dict
    layout = detect_layout(sd, layout=PEFT.name)
    settings.check_tensors(layout)
    return PeftAdapter(sd, source.config, layout, source.path, settings.scales(layout), settings)


def peft_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Mapping[str, float],
    fan_in_fan_out: bool = False,
    task_type: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` for PEFT-keyed ``state_dict`` with ``alpha`` per module.

    ``r`` and ``lora_alpha`` are the most common values; other modules get exact ``rank_pattern`` /
    ``alpha_pattern`` entries.
    """
    layout = detect_layout(state_dict, layout=PEFT.name)
    ranks = {m.name: m.rank for m in layout.modules if m.has_factors}
    rank = max(sorted(set(ranks.values())), key=list(ranks.values()).count)
    alpha0 = max(sorted(set(alpha.values())), key=list(alpha.values()).count)
    use_dora = any(m.is_dora for m in layout.modules)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha0,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in ranks}),
        "fan_in_fan_out": fan_in_fan_out,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(n): a for n, a in alpha.items() if a != alpha0},
        "use_rslora": False,
        "use_dora": use_dora,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        **dict(extra_config or {}),
    }


def save_peft_adapter(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Mapping[str, float],
    fan_in_fan_out: bool = False,
    task_type: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT adapter folder (config + ``adapter_model.safetensors``); returns the folder.

    ``state_dict`` holds PEFT's saved keys (``base_model.model.<module>.lora_A.weight`` …) and
    ``alpha`` the alpha per module (see :func:`peft_config`). The folder is assembled beside the target
    and moved into place; an existing adapter is replaced only with ``overwrite=True``.
    """
    out = Output.prepare(path, overwrite=overwrite, folder=True)
    with out.writing() as tmp:
        write_peft_adapter(tmp, state_dict, alpha=alpha, fan_in_fan_out=fan_in_fan_out, task_type=task_type,
                           extra_config=extra_config)
    return out.path


def write_peft_adapter(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Mapping[str, float],
    fan_in_fan_out: bool = False,
    task_type: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> None:
    """Fill the (staging) folder ``folder`` with the adapter as :func:`save_peft_adapter` does."""
    config = peft_config(state_dict, alpha=alpha, fan_in_fan_out=fan_in_fan_out, task_type=task_type,
                         extra_config=extra_config)
    write_checkpoint(folder / WEIGHT_NAMES[0], dict(state_dict))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
