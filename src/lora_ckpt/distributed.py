"""Live models whose parameters are DTensors (FSDP2 ``fully_shard``, tensor parallel): merged and loaded shard by shard.

:func:`~lora_ckpt.merged_state_dict` and :func:`~lora_ckpt.load_into` come here when a model's state dict holds
DTensors; users call those. Each rank works on its own shard: a merged weight is ``W_local + s · (B @ A)_local``,
where the factor running along W's rows is used as the rank holds it when it is split like W (B's rows for an FSDP2
``Shard(0)`` weight) and only the other, small factor is all-gathered; a column-split weight (``Shard(1)``) takes
that factor whole too (r x width), to round every element as the single-process merge does (see
:func:`merge_block`). No rank ever holds a whole base weight; results are DTensors placed like the model's weights,
ready for ``torch.distributed.checkpoint.save``.

Every rank runs the same steps in the same order (the factor gathers are collectives), and an error found on one
rank (a non-finite shard, a file missing on its storage, a scale it cannot resolve) is raised on every rank, with the
same message, so no rank waits forever for the others: the arguments are compared across ranks first
(:meth:`ShardedState.of`), and every step that can fail on one rank alone runs under :func:`agree` or
:func:`ranks_agree`. Nothing of ``torch.distributed`` is imported for a plain model.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, TypeVar

import torch

from lora_ckpt import errors
from lora_ckpt.checkpoint import Checkpoint
from lora_ckpt.convert import Conversion, convert_state_dict
from lora_ckpt.errors import LayoutError, LoraCkptError, brief
from lora_ckpt.io import as_checkpoint
from lora_ckpt.layout import FORMULAS, Layout, LoraModule, detect_layout, tied_groups
from lora_ckpt.merge import (
    Alpha, MergePlan, Orientation, Step, check_finite, check_scale, merge_rows, module_factors, orientation, plan_merge,
    resolve_scales,
)
from lora_ckpt.output import PathLike
from lora_ckpt.source import Source

__all__ = ["ShardedState", "agree", "holds_dtensors", "ranks_agree"]

T = TypeVar("T")
#: Per dimension, the (start, length) of a block of a tensor.
Box = tuple[tuple[int, int], ...]
_BLOCK_BYTES = 8 << 20  # rows read or merged at a time where a block keeps only some columns


def holds_dtensors(state_dict: Mapping[str, Any]) -> bool:
    """Whether any value of ``state_dict`` is a DTensor (False where torch has no ``torch.distributed``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(v, dtensor) for v in state_dict.values())


def _dtensor_type() -> type | None:
    """DTensor's class where ``torch.distributed.tensor`` was imported (no DTensor can exist before): no import here."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _is_dtensor(t: object) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def _box(t: torch.Tensor) -> Box:
    """The block of the global tensor that this rank's local shard of ``t`` holds (the whole tensor if plain)."""
    if not _is_dtensor(t):
        return tuple((0, n) for n in t.shape)
    chunks = t.__create_chunk_list__()  # type: ignore[attr-defined]
    if len(chunks) != 1:  # pragma: no cover - DTensor gives one chunk per rank
        raise LayoutError(f"a DTensor of shape {tuple(t.shape)} reports {len(chunks)} local chunks; expected one")
    return tuple(zip((int(o) for o in chunks[0].offsets), (int(s) for s in chunks[0].sizes)))


def _slice(t: torch.Tensor, box: Box) -> torch.Tensor:
    for dim, (start, length) in enumerate(box):
        if (start, length) != (0, t.shape[dim]):
            t = t.narrow(dim, start, length)
    return t


def _block(t: torch.Tensor, box: Box, *, aligned: bool) -> torch.Tensor:
    """The block ``box`` of ``t`` as a plain tensor: its local shard where ``aligned`` (the shard is that block),
    else gathered (a collective: every rank must ask in the same order) and cut."""
    if not _is_dtensor(t):
        return _slice(t, box)
    if aligned:
        if _box(t) != box:  # pragma: no cover - aligned placements give the same chunks
            raise LayoutError(f"a DTensor's local block {_box(t)} is not the expected {box}; redistribute it")
        return _local(t)
    return _slice(t.full_tensor(), box)  # type: ignore[attr-defined]


def _like(local: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``local`` as the rank's shard of a tensor placed like ``ref`` (``local`` itself where ``ref`` is plain)."""
    if not _is_dtensor(ref):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,  # type: ignore[attr-defined]
                              shape=ref.shape, stride=ref.stride())


def _same_placement(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether DTensors ``a`` and ``b`` are split alike (same mesh, placements and shape): equal local blocks."""
    return (_is_dtensor(a) and _is_dtensor(b) and a.device_mesh == b.device_mesh  # type: ignore[attr-defined]
            and tuple(a.placements) == tuple(b.placements) and a.shape == b.shape)  # type: ignore[attr-defined]


def _mirrors(factor: torch.Tensor, fdim: int, ref: torch.Tensor, wdim: int) -> bool:
    """Whether ``factor``'s dimension ``fdim`` is split like ``ref``'s dimension ``wdim`` and nothing else of it is:
    then its local shard is exactly the slice the rank's block of ``ref`` needs, and no gather is required."""
    if not _is_dtensor(factor):
        return False
    if not _is_dtensor(ref) or factor.device_mesh != ref.device_mesh:  # type: ignore[attr-defined]
        return False
    for p, q in zip(ref.placements, factor.placements):  # type: ignore[attr-defined]
        if p.is_shard(wdim):
            same = (type(q) is type(p) and q.is_shard(fdim)
                    and getattr(q, "split_factor", None) == getattr(p, "split_factor", None))
            if not same:
                return False
        elif not q.is_replicate():
            return False
    return True


def factor_axes(module: LoraModule, transposed: bool) -> tuple[tuple[str, int], tuple[str, int]]:
    """``((role, dim), (role, dim))``: the factor (``"a"`` or ``"b"``) and its dimension that run along the update's
    rows, then along its columns, in the base weight's stored orientation; read off :data:`~lora_ckpt.layout.FORMULAS`
    (which stays the one owner of the formulas) by probing it with ``meta`` factors of distinct sizes."""
    a, b = torch.empty(2, 3, device="meta"), torch.empty(5, 7, device="meta")
    left, right = FORMULAS[module.formula][2](a, b)
    if transposed:
        left, right = right.T, left.T
    where = {2: ("a", 0), 3: ("a", 1), 5: ("b", 0), 7: ("b", 1)}
    return where[left.shape[0]], where[right.shape[1]]


def agree(run: Callable[[], T]) -> T:
    """Run ``run`` on every rank and return its result; if any rank failed, raise on every rank the first failing
    rank's error (in rank order).

    A check that fails on one rank only (a shard with NaNs, a file missing on that rank's storage) would otherwise
    leave the others waiting in their next collective. Any exception counts: a lora_ckpt error is raised on every rank
    as the same type with the same message; any other is re-raised by the rank that raised it, while the others raise
    a :class:`~lora_ckpt.errors.LoraCkptError` naming that rank, the error's type and the first line of its message.
    A collective (one ``all_gather_object`` on the default process group): every rank must call it.
    """
    mine: Exception | None = None
    result: T | None = None
    try:
        result = run()
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, or they wait forever
        mine = e
    _settle(mine)
    return result  # type: ignore[return-value]


@contextmanager
def ranks_agree(shards: ShardedState | None) -> Iterator[None]:
    """A block that every rank of a sharded model leaves together: any rank's failure in it is raised on every rank,
    as :func:`agree` does; nothing at all (no collective) where ``shards`` is None, a plain model.

    Example:
        >>> with ranks_agree(None):  # a plain model: the block runs as it is
        ...     scale = 16.0 / 8
    """
    if shards is None:
        yield
        return
    mine: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - as in agree
        mine = e
    _settle(mine)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _settle(mine: Exception | None) -> None:
    """Share whether this rank failed; raise on every rank the first failure, if any (see :func:`agree`)."""
    import torch.distributed as dist

    told = None if mine is None else (type(mine).__name__, str(mine) if isinstance(mine, LoraCkptError)
                                      else _one_line(mine), isinstance(mine, LoraCkptError))
    said: list[tuple[str, str, bool] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(said, told)
    failed = [(r, s) for r, s in enumerate(said) if s is not None]
    if not failed:
        return
    rank, (kind, text, ours) = failed[0]
    if told is not None and told[:2] == (kind, text):
        raise mine  # type: ignore[misc]
    if ours:
        cls = getattr(errors, kind, None)
        err = (cls if isinstance(cls, type) and issubclass(cls, LoraCkptError) else LoraCkptError)(text)
        err.add_note(f"raised on rank {rank}; every rank of the process group raises it")
        raise err
    raise LoraCkptError(f"rank {rank} failed: {kind}: {text}")


def _is_checkpoint(v: object) -> bool:
    return isinstance(v, Checkpoint) or (isinstance(v, Mapping) and any(
        isinstance(x, (torch.Tensor, Mapping)) for x in v.values()))


def _text(v: object) -> str:
    """A text equal for equal arguments on any rank: tensors by shape and dtype, numbers as floats."""
    if _is_checkpoint(v):
        ckpt = as_checkpoint(v)  # type: ignore[arg-type]
        tensors = ", ".join(f"{k!r}: {_text(x)}" for k, x in sorted(ckpt.state_dict.items()))
        return f"state_dict {{{tensors}}} alpha {_text(ckpt.alpha)}"
    if isinstance(v, torch.Tensor):
        return f"<{tuple(v.shape)} {v.dtype}>"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k!r}: {_text(x)}" for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_text(x) for x in v) + ")"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return repr(float(v))
    if isinstance(v, os.PathLike):
        return repr(os.fspath(v))
    if v is None or isinstance(v, (str, bool, torch.dtype)):
        return repr(v)
    return f"<{type(v).__name__}>"  # an object's repr may show its address: the same argument would differ


def _fingerprint(value: object) -> tuple[str, str]:
    """``(digest, shown)`` of an argument, equal on ranks that passed the same one: a state dict or checkpoint by its
    keys, shapes, dtypes and recorded alpha (never its values, which are each rank's own shards)."""
    digest = hashlib.sha256(_text(value).encode()).hexdigest()[:12]
    if _is_checkpoint(value):
        return digest, f"a state dict (keys, shapes and dtypes digest {digest})"
    return digest, repr(os.fspath(value)) if isinstance(value, os.PathLike) else brief(value)


@dataclass(frozen=True)
class _Reader:
    """A checkpoint seen as ``meta`` tensors for planning, with rank-local block reads of its real tensors."""

    meta: Checkpoint
    tensors: Mapping[str, torch.Tensor] | None
    source: Source | None

    @classmethod
    def open(cls, checkpoint: Checkpoint | Mapping[str, Any] | PathLike) -> _Reader:
        if isinstance(checkpoint, (Checkpoint, Mapping)):
            ckpt = as_checkpoint(checkpoint)
            metas = {k: _meta(v) for k, v in ckpt.state_dict.items()}
            return cls(replace(ckpt, state_dict=metas), ckpt.state_dict, None)
        source = Source.open(checkpoint)
        info = source.recorded()
        return cls(replace(info, state_dict=source.meta_tensors()), None, source)

    def read(self, key: str, box: Box, *, like: torch.Tensor | None = None) -> torch.Tensor:
        """The block ``box`` of ``key``: its rows read from the file (about 8 MiB at a time where only some
        columns are kept, so a column-sharded block never holds the whole tensor), the other dimensions cut."""
        if self.tensors is not None:
            t = self.tensors[key]
            return _block(t, box, aligned=like is not None and _same_placement(t, like))
        assert self.source is not None
        if not box:
            return self.source.read(key)
        entry = self.source.entries[key]
        (start, length), rest = box[0], box[1:]
        if all(span == (0, n) for span, n in zip(rest, entry.shape[1:])):
            return self.source.read(key, start, start + length)
        out = torch.empty((length, *(n for _, n in rest)), dtype=entry.dtype)
        step = max(1, _BLOCK_BYTES // max(1, entry.nbytes // max(1, entry.shape[0])))
        for r in range(0, length, step):
            stop = min(r + step, length)
            out[r:stop] = _slice(self.source.read(key, start + r, start + stop), ((0, stop - r), *rest))
        return out

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


class ShardedState:
    """A live model's state dict that holds DTensors: its global ``meta`` view, its layout, and the rank-local work.

    Make one with :meth:`of`. Keys are the state dict's own; ``plain`` are the same tensors by key without wrapper
    prefix. Plain tensors beside DTensors (FSDP2 leaves buffers unsharded) are taken as the same on every rank.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = dict(state_dict)
        self.meta = {k: _meta(v) for k, v in self.state_dict.items()}

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor], *,
           settings: Mapping[str, object] | None = None) -> ShardedState | None:
        """A :class:`ShardedState` for ``state_dict`` where it holds DTensors, else None (and no collective).

        Where it does, this is the first collective: ``settings`` (the caller's arguments by name: alpha, dtype,
        the checkpoint's path, or an in-memory state dict by its keys, shapes and dtypes) are compared across the
        ranks, and where one differs every rank raises the same :class:`~lora_ckpt.errors.LoraCkptError` naming it.
        """
        if not holds_dtensors(state_dict):
            return None
        state = cls(state_dict)
        state._check_settings(settings or {})
        return state

    @staticmethod
    def _check_settings(settings: Mapping[str, object]) -> None:
        import torch.distributed as dist

        mine = agree(lambda: {name: _fingerprint(value) for name, value in settings.items()})
        said: list[dict[str, tuple[str, str]]] = [{}] * dist.get_world_size()
        dist.all_gather_object(said, mine)
        for name in mine:
            other = next((r for r, s in enumerate(said) if s.get(name, ("",))[0] != said[0][name][0]), None)
            if other is not None:
                raise LoraCkptError(
                    f"the ranks passed different {name}: {said[0][name][1]} on rank 0, {said[other][name][1]} on rank "
                    f"{other}; every rank must pass the same arguments (and see the same checkpoint)"
                )

    def layout(self) -> Layout:
        """The layout, detected from global shapes, with the tied groups the local shards share storage for."""
        layout = agree(lambda: detect_layout(self.meta))
        import torch.distributed as dist

        local = {k[len(layout.prefix):]: _local(v) for k, v in self.state_dict.items()}
        seen: list[tuple[tuple[str, ...], ...] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, tied_groups(local))  # a rank with an empty shard cannot see a tie: take the most
        return replace(layout, tied=max((g or () for g in seen), key=len))

    def _tensors(self, layout: Layout) -> dict[str, torch.Tensor]:
        return {k[len(layout.prefix):]: v for k, v in self.state_dict.items()}

    def _check_modules(self, layout: Layout, *, merging: bool) -> None:
        """Refuse a LoRA module whose tensors mix DTensors and plain tensors, DoRA (when merging), Partial shards."""
        tensors = self._tensors(layout)
        mixed, dora, partial, conv = [], [], [], []
        for m in layout.modules:
            present = [k for k in m.keys if k in tensors and m.key_map.get("alpha") != k]
            kinds = {_is_dtensor(tensors[k]) for k in present}
            if len(kinds) > 1:
                d = next(k for k in present if _is_dtensor(tensors[k]))
                p = next(k for k in present if not _is_dtensor(tensors[k]))
                mixed.append(f"{m.name} ({d} is a DTensor, {p} a plain tensor)")
            if merging and m.is_dora and m.has_factors:
                dora.append(m.name)
            partial += [k for k in present if _is_dtensor(tensors[k])
                        and any(p.is_partial() for p in tensors[k].placements)]  # type: ignore[attr-defined]
            if merging and m.has_factors and any(_is_dtensor(tensors[k]) and tensors[k].dim() > 2 for k in present):
                conv.append(m.name)
        if mixed:
            raise LayoutError(
                f"LoRA modules mix DTensors and plain tensors: {'; '.join(mixed[:3])}; a plain tensor beside DTensors "
                "may be a replica or a rank's piece, and nothing says which: shard the whole module with its factors "
                "(fully_shard or parallelize_module it as one)"
            )
        if dora:
            raise LayoutError(
                f"{', '.join(dora[:3])}: DoRA modules cannot be merged on shards (their magnitude rescales by the "
                "norm of whole rows); gather the model (torch.distributed.checkpoint.state_dict.get_model_state_dict "
                "with full_state_dict=True) and merge that with merge_lora"
            )
        if partial:
            raise LayoutError(f"{', '.join(partial[:3])}: Partial DTensors (a pending reduction) cannot be merged or "
                              "loaded; redistribute them to Shard or Replicate placements first")
        if conv:
            raise LayoutError(f"{', '.join(conv[:3])}: convolution weights as DTensors are not supported; gather the "
                              "model and merge with merge_lora")

    # --- merging ---------------------------------------------------------------------------------

    def merge(
        self,
        layout: Layout,
        *,
        scales: Mapping[str, float],
        dtype: torch.dtype | None = None,
        tied: Literal["untie", "tie"] = "untie",
        fan_in_fan_out: Orientation = None,
    ) -> dict[str, torch.Tensor]:
        """Return the standard-layout state dict, merged shard by shard: DTensors placed like the base weights.

        Collective: every rank of the default process group must call it. See
        :func:`~lora_ckpt.merged_state_dict`, which calls it for models that hold DTensors.

        Raises:
            LayoutError: a module mixes DTensors and plain tensors; DoRA; Partial or convolution DTensors.
            ShapeError, AlphaError: as :func:`~lora_ckpt.merge_lora` (raised on every rank).
        """
        tensors = self._tensors(layout)
        # Planning sees global shapes (meta) for every base weight and each rank's own factor shards (their
        # values are checked for NaNs; the plan reads no factor shape): any rank's refusal is everyone's.
        factor_keys = layout.factor_keys
        view = {k: _local(v) if k in factor_keys else _meta(v) for k, v in tensors.items()}

        def planned() -> MergePlan:
            self._check_modules(layout, merging=True)
            return plan_merge(view, scales=scales, tied=tied, dtype=dtype, layout=layout, fan_in_fan_out=fan_in_fan_out)

        plan = agree(planned)
        found: list[Exception] = []
        done: dict[str, torch.Tensor] = {}
        for step in plan.steps:
            if step.op == "copy":
                done[step.key] = plan.compute(step, tensors)  # a cast at most: DTensors stay as they are placed
            elif step.op == "bias":
                done[step.key] = self._merged_bias(plan, step, tensors, found)
            elif step.op == "merge":
                done[step.key] = self._merged(plan, step, tensors, found)
        agree(lambda: _raise_first(found))
        return {s.key: done[s.source if s.op == "alias" else s.key] for s in plan.steps}  # type: ignore[index]

    def _merged(self, plan: MergePlan, step: Step, tensors: Mapping[str, torch.Tensor],
                found: list[Exception]) -> torch.Tensor:
        m = step.module
        assert m is not None
        base = tensors[step.source] if step.source is not None else None
        factors = {r: tensors[m.key_map[r]] for r in ("a", "b")}
        if not any(_is_dtensor(t) for t in (*factors.values(), *(() if base is None else (base,)))):
            return _guarded(lambda: plan.compute(step, tensors), found, fallback=_meta(tensors[m.a_key]))
        meta_base = None if base is None else _meta(base)
        transposed = meta_base is not None and orientation(m, meta_base, plan.fan_in_fan_out)
        (row_role, row_dim), (col_role, col_dim) = factor_axes(m, transposed)
        if base is None:  # a lora-only embedding: the result is split like the factor along its rows
            ref, box = self._lora_only_target(m, factors[row_role], row_dim, factors[col_role].shape[col_dim])
        else:
            ref, box = base, _box(base)
        rows_factor, cols_factor = factors[row_role], factors[col_role]
        pieces = {  # the rows this block needs of one factor; the other factor whole (see merge_block)
            m.key_map[row_role]: _block(rows_factor, _want(rows_factor, row_dim, box[0]),
                                        aligned=_mirrors(rows_factor, row_dim, ref, 0)),
            m.key_map[col_role]: _block(cols_factor, _want(cols_factor, col_dim, None),
                                        aligned=box[1] == (0, ref.shape[1]) and _mirrors(cols_factor, col_dim, ref, 1)),
        }
        local = None if base is None else _local(base)
        merged = _guarded(lambda: merge_block(m, pieces, local, meta_base, step.scale, columns=box[1],
                                              dtype=plan.dtype, fan_in_fan_out=plan.fan_in_fan_out),
                          found, fallback=torch.empty(0))
        return _like(merged, ref)

    def _lora_only_target(self, m: LoraModule, row_factor: torch.Tensor, row_dim: int,
                          cols: int) -> tuple[torch.Tensor, Box]:
        """Placement and local block of a lora-only embedding's weight: rows split like the factor that runs along
        them, where that factor is split along those rows only; otherwise whole on every rank."""
        from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

        rows = row_factor.shape[row_dim]
        if not _is_dtensor(row_factor):
            return torch.empty((rows, cols), device="meta"), ((0, rows), (0, cols))
        placements: list[Placement] = []
        for q in row_factor.placements:  # type: ignore[attr-defined]
            if type(q) is Shard and q.is_shard(row_dim):
                placements.append(Shard(0))
            elif q.is_replicate():
                placements.append(Replicate())
            else:
                placements = [Replicate()] * len(row_factor.placements)  # type: ignore[attr-defined]
                break
        mesh = row_factor.device_mesh  # type: ignore[attr-defined]
        local = torch.empty((0, 0), dtype=row_factor.dtype, device=_local(row_factor).device)
        ref = DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size((rows, cols)),
                                 stride=(cols, 1))
        if all(p.is_replicate() for p in placements):
            return ref, ((0, rows), (0, cols))
        return ref, (_box(row_factor)[row_dim], (0, cols))

    def _merged_bias(self, plan: MergePlan, step: Step, tensors: Mapping[str, torch.Tensor],
                     found: list[Exception]) -> torch.Tensor:
        m = step.module
        assert m is not None and step.source is not None
        bias, key = tensors[step.source], m.key_map["b_bias"]
        lora_bias = _block(tensors[key], _box(bias), aligned=_same_placement(tensors[key], bias))
        local_plan = replace(plan, big={step.source: _local(bias)}, adapter={key: lora_bias})
        return _like(_guarded(lambda: local_plan.compute(step, local_plan.big), found, fallback=torch.empty(0)), bias)

    # --- loading ---------------------------------------------------------------------------------

    def convert(
        self,
        checkpoint: Checkpoint | Mapping[str, Any] | PathLike,
        layout: Layout,
        *,
        alpha: Alpha | None = None,
        target_alpha: Alpha | None = None,
        ignore: Iterable[str] = (),
    ) -> Conversion:
        """``checkpoint`` converted to this model's layout, each rank reading and computing only its own blocks.

        The conversion is planned by :func:`~lora_ckpt.convert.convert_state_dict` on ``meta`` tensors (the same
        report, strictness and shape rules as a single process); then each value is read as the rank's block of
        the model's tensor (rows ``start:stop`` of a file, never the whole tensor), merged updates computed on
        that block. LoRA factors the checkpoint cannot supply are left to :func:`~lora_ckpt.load_into`.
        Values are DTensors placed like the model's (plain where the model's are), keyed without wrapper prefix.
        """
        model = self._tensors(layout)
        opened: list[_Reader] = []

        def planned() -> tuple[_Reader, Conversion, Layout, dict[str, float]]:
            # everything that can fail on one rank alone (the file on its storage, the plan, the scales) before
            # any collective: agreed, so every rank raises the same error
            self._check_modules(layout, merging=False)
            reader = _Reader.open(checkpoint)
            opened.append(reader)
            conversion = convert_state_dict(reader.meta, layout, alpha=alpha, target_alpha=target_alpha,
                                            ignore=ignore, keep_factors=True)
            src = detect_layout(reader.meta.state_dict)
            scales: dict[str, float] = {}
            if "merge" in conversion.sources.values():
                scales = resolve_scales(src, reader.meta.resolve_alpha(alpha))
            return reader, conversion, src, scales

        try:
            reader, conversion, src, scales = agree(planned)
            key_of = {id(v): k for k, v in reader.meta.state_dict.items()}
            found: list[Exception] = []
            values: dict[str, torch.Tensor] = {}
            for key, value in conversion.values.items():
                target = model[key]
                try:
                    if conversion.sources[key] == "merge":
                        local = self._merged_read(key, layout, src, reader, scales, target, found)
                    else:
                        local = reader.read(key_of[id(value)], _box(target), like=target)
                except Exception as e:  # noqa: BLE001 - a failed read (a file truncated on one rank's storage)
                    found.append(e)  # is raised by agree below, on every rank
                    local = torch.empty(tuple(n for _, n in _box(target)))
                values[key] = _like(local.to(target.dtype), target)
            agree(lambda: _raise_first(found))
        finally:
            for opened_reader in opened:
                opened_reader.close()
        return Conversion(values, conversion.sources, conversion.report)

    def _merged_read(self, key: str, dst: Layout, src: Layout, reader: _Reader, scales: Mapping[str, float],
                     target: torch.Tensor, found: list[Exception]) -> torch.Tensor:
        """The rank's block of ``key``, which receives a checkpoint module's merged update."""
        owner = dst.module_by_key.get(key)
        s = src.module(owner.name if owner is not None else key.removesuffix(".weight"))
        if s.is_dora:
            raise LayoutError(f"{s.name}: a DoRA update cannot be merged into a sharded model's block (the magnitude "
                              "needs whole rows); load it into an unsharded model, or one with the checkpoint's rank")
        full = {k: reader.meta.state_dict[src.prefix + k] for k in s.keys}
        meta_base = full[s.weight_key] if s.has_base else None
        box = _box(target)
        transposed = meta_base is not None and orientation(s, meta_base, None)
        (row_role, row_dim), (col_role, col_dim) = factor_axes(s, transposed)
        row_key, col_key = s.key_map[row_role], s.key_map[col_role]
        pieces = {row_key: reader.read(src.prefix + row_key, _want(full[row_key], row_dim, box[0])),
                  col_key: reader.read(src.prefix + col_key, _want(full[col_key], col_dim, None))}
        base = reader.read(src.prefix + s.weight_key, box) if s.has_base else None
        return _guarded(lambda: merge_block(s, pieces, base, meta_base, scales[s.name], columns=box[1],
                                            dtype=dst.dtypes[key], fan_in_fan_out=None),
                        found, fallback=torch.empty(tuple(n for _, n in box)))


def _want(factor: torch.Tensor, dim: int, span: tuple[int, int] | None) -> Box:
    """The block of ``factor`` that is ``span`` along ``dim`` (whole where None) and whole along its other dims."""
    return tuple((span if d == dim and span is not None else (0, n)) for d, n in enumerate(factor.shape))


def merge_block(
    module: LoraModule,
    pieces: Mapping[str, torch.Tensor],
    base: torch.Tensor | None,
    meta_base: torch.Tensor | None,
    scale: float,
    *,
    columns: tuple[int, int],
    dtype: torch.dtype | None,
    fan_in_fan_out: Orientation,
) -> torch.Tensor:
    """One block of a merged weight, ``base + scale · left @ right``, bit for bit as the whole-weight merge gives it.

    ``pieces`` hold the factor running along the rows cut to the block's rows, and the other factor whole;
    ``base`` is the block (None for a lora-only embedding), ``meta_base`` the whole weight's shape, ``columns``
    the block's (start, length) of the weight's columns. Accumulated and rounded once as
    :func:`~lora_ckpt.merge.merge_module` does. Where the block holds only some columns (tensor parallel
    ``Shard(1)``), the update is computed for rows of the full width, a bounded block at a time, and cut: a matrix
    product's rounding depends on where a column sits in it, and this keeps every element where the single-process
    merge computes it (a rank-``r`` product over the full width costs little beside reading the weight).
    """
    device = base.device if base is not None else next(iter(pieces.values())).device
    f = module_factors(module, pieces, meta_base, dtype=dtype, fan_in_fan_out=fan_in_fan_out, device=device)
    check_scale(module.name, scale, f.acc)
    width = f.right.shape[1]
    if base is None or columns == (0, width):
        merged = merge_rows(base, f.left, f.right, scale, f.acc, f.out_dtype)
    else:
        start, length = columns
        merged = torch.empty(tuple(base.shape), dtype=f.out_dtype, device=device)
        step = max(1, _BLOCK_BYTES // (4 * width))  # rows of about 8 MiB of float32 at full width
        for r in range(0, base.shape[0], step):
            padded = torch.zeros((min(step, base.shape[0] - r), width), dtype=f.acc, device=device)
            padded[:, start:start + length] = base[r:r + step]
            full = merge_rows(padded, f.left[r:r + step], f.right, scale, f.acc, f.acc)
            merged[r:r + step] = full[:, start:start + length]  # the one rounding to the output dtype
    check_finite(module.name, merged, base, scale)
    return merged


def _guarded(run: Callable[[], torch.Tensor], found: list[Exception], *, fallback: torch.Tensor) -> torch.Tensor:
    """``run()``, or ``fallback`` with the error kept for :func:`agree` (the rank must still join later gathers)."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - kept for agree, which raises it on every rank
        found.append(e)
        return fallback


def _raise_first(found: list[Exception]) -> None:
    if found:
        raise found[0]

