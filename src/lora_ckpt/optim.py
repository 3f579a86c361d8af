"""Carrying optimizer state across a change of parameters, by parameter name and shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_ckpt._table import Compact
from lora_ckpt.errors import KeyMismatchError
from lora_ckpt.layout import canonical_key
from lora_ckpt.model import unwrap

__all__ = ["OptimizerReport", "named_optimizer_state", "transfer_optimizer_state"]


@dataclass(repr=False)
class OptimizerReport(Compact):
    """Parameter names whose state was ``transferred``, started ``fresh``, or ``dropped`` from the old run."""

    transferred: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"optimizer state: {len(self.transferred)} transferred, {len(self.fresh)} fresh, "
            f"{len(self.dropped)} dropped"
        )


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Return the optimizer's state dict keyed by parameter name (torch's own ``get_optimizer_state_dict``).

    Save this rather than ``optimizer.state_dict()``, whose integer keys mean nothing once the
    parameter set changes.
    """
    # imported here: torch.distributed.checkpoint takes half a second to import
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer)


def _saved_by_name(saved: Mapping[str, Any], names: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    state = saved.get("state")
    groups = saved.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(groups, Sequence):
        raise KeyMismatchError("not an optimizer state dict: expected 'state' and 'param_groups' entries")
    if all(isinstance(k, str) for k in state):
        return {canonical_key(k): v for k, v in state.items()}
    ids = [i for g in groups for i in g["params"]]
    if names is None:
        names = [n for g in groups for n in g.get("param_names", [])]
        if len(names) != len(ids):
            raise KeyMismatchError(
                "the optimizer state has integer keys and no parameter names, so it cannot be matched to "
                "parameters; save it with lora_ckpt.named_optimizer_state, build the optimizer from "
                "model.named_parameters(), or pass names=[...] in the old optimizer's parameter order"
            )
    if len(names) != len(ids):
        raise KeyMismatchError(f"names has {len(names)} entries but the optimizer state has {len(ids)} parameters")
    by_id = dict(zip(ids, names))
    return {canonical_key(by_id[i]): v for i, v in state.items()}


def _fits(state: Mapping[str, Any], p: torch.Tensor) -> bool:
    return all(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape == p.shape for v in state.values())


def transfer_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    saved: Mapping[str, Any],
    *,
    names: Sequence[str] | None = None,
) -> OptimizerReport:
    """Load the old run's optimizer state into ``optimizer`` where each parameter's name and shape still fit.

    Names are compared without wrapper prefixes and with ``main_weight`` folded, so a parameter keeps
    its state across standard <-> LoRA layouts. State that does not fit (a LoRA factor of another
    rank) is dropped, the parameter starts fresh, and the report lists both. The new optimizer's
    hyperparameters (learning rate …) are kept.

    Args:
        optimizer: the new run's optimizer over ``model``'s parameters.
        model: the new model (compiled or wrapped is fine).
        saved: the old optimizer state: name-keyed (:func:`named_optimizer_state`), or integer-keyed
            with ``param_names`` (optimizers built from ``named_parameters()``) or with ``names``.
        names: the old parameter names in the old optimizer's order, for integer-keyed state without
            ``param_names``.

    Raises:
        KeyMismatchError: the saved state cannot be matched to names.
    """
    old = _saved_by_name(saved, names)
    name_of: dict[int, str] = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        name_of.setdefault(id(p), name)
    current = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    report = OptimizerReport()
    new_state: dict[int, Any] = {}
    taken: set[str] = set()
    for index, p in zip((i for g in current["param_groups"] for i in g["params"]), params):
        if id(p) not in name_of:
            raise KeyMismatchError("the optimizer holds a parameter that is not in the model; pass the model it optimizes")
        name = name_of[id(p)]
        key = canonical_key(name)
        st = old.get(key)
        if st is not None and _fits(st, p):
            new_state[index] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            taken.add(key)
            report.transferred.append(name)
        else:
            report.fresh.append(name)
    report.dropped = [k for k in old if k not in taken]
    current["state"] = new_state
    optimizer.load_state_dict(current)
    return report
