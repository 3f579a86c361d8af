"""Reading and writing checkpoint files: ``.safetensors`` and torch pickles (``.pt``/``.pth``/``.bin``/``.ckpt``).

Reading goes through :class:`~lora_ckpt.source.Source` (every input validated, pickles only with
``weights_only=True``); writing goes through :class:`~lora_ckpt.output.Output` (staged beside the
target and moved into place once complete, so no failure leaves a partial file and an input is never
damaged); lora_ckpt's metadata through :class:`~lora_ckpt.filemeta.FileMeta`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lora_ckpt.checkpoint import Checkpoint, checkpoint_from_dict, is_state_dict
from lora_ckpt.errors import CheckpointFileError, LayoutError
from lora_ckpt.filemeta import META_KEY, FileMeta
from lora_ckpt.layout import Layout, detect_layout, tied_groups
from lora_ckpt.output import FILE_SUFFIXES, Output, PathLike
from lora_ckpt.source import Source

__all__ = ["Checkpoint", "PathLike", "as_checkpoint", "check_safetensors_keys", "file_meta", "load_checkpoint",
           "save_checkpoint", "write_checkpoint"]


def check_safetensors_keys(keys: Iterable[str], where: object) -> None:
    """Refuse keys a safetensors header cannot hold as tensor names (``__metadata__``, the empty string)."""
    bad = [k for k in keys if k in ("", "__metadata__")]
    if bad:
        raise CheckpointFileError(f"{where}: a safetensors file cannot hold a tensor named {bad[0]!r}; rename or drop "
                                  "it, or write a .pt file")


def as_checkpoint(source: Checkpoint | Mapping[str, Any] | PathLike) -> Checkpoint:
    """Return ``source`` as a :class:`Checkpoint`: a file or folder path, a checkpoint dict or a state dict.

    Raises:
        CheckpointFileError: the file cannot be read (see :func:`load_checkpoint`).
        LayoutError: a mapping that is neither a state dict nor holds one under ``model``/``state_dict``.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_checkpoint(source)
    if is_state_dict(source):
        return Checkpoint(dict(source))
    return checkpoint_from_dict(source, None)


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Return the checkpoint stored at ``path``; pickles are loaded with ``weights_only=True``.

    ``path`` is a file, a Hugging Face model folder (sharded too) or a PEFT adapter folder (its
    tensors). The format follows the file's content (safetensors header, torch zip or legacy pickle),
    not only its name. Tensors land on the CPU; ``.pt`` files are memory-mapped where their format allows.

    Raises:
        CheckpointFileError: missing, unreadable, corrupt or truncated file, or an unknown format.
        UnsafeCheckpointError: a pickle that would run code (or use types other than tensors and
            plain containers) to load.
        LayoutError: the file holds no state dict.
    """
    with Source.open(path) as source:
        return source.load()


def file_meta(
    state_dict: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float] | None,
    *,
    layout: Layout | None = None,
    model_args: Mapping[str, Any] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> FileMeta:
    """The lora_ckpt metadata to record for ``state_dict``: its layout, per-module alpha, tied groups, module kinds.

    ``layout`` is detected when not given, settled by ``kinds`` (as :func:`~lora_ckpt.detect_layout` takes them:
    a converter passes the kinds of the layout it converted from). In layouts whose keys do not tell linear
    modules and embeddings apart (loralib, minLoRA, nanoGPT's fork) every LoRA module's kind is recorded, so
    reading the file back needs no ``kinds``; a state dict whose kinds stay ambiguous (loralib factors of a
    square weight, no ``kinds``) records no layout and no kinds: what only a merge needs is asked for there.
    """
    if layout is None:
        try:
            layout = detect_layout(state_dict, kinds=kinds)  # type: ignore[arg-type]
        except LayoutError:
            layout = None
    recorded: float | dict[str, float] | None = None
    if alpha is not None and (isinstance(alpha, Mapping) or layout is None):
        recorded = {k: float(v) for k, v in alpha.items()} if isinstance(alpha, Mapping) else float(alpha)
    elif alpha is not None and layout is not None:
        recorded = {m.name: float(alpha) for m in layout.modules if m.has_factors}
    by_shape = layout is not None and layout.spec is not None and layout.spec.kinds_by_shape
    return FileMeta(layout=layout.kind if layout is not None else None, alpha=recorded,
                    tied=tied_groups(dict(state_dict)), model_args=dict(model_args) if model_args else None,
                    kinds=layout.kinds if by_shape and layout is not None else {})


def save_checkpoint(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: float | Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    kinds: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` to ``path`` atomically and return the path; never leaves a partial file.

    ``.safetensors`` stores the tensors (tied tensors once, restored as tied on load) and lora_ckpt's
    metadata (layout, per-module alpha, ``model_args``). ``.bin`` is Hugging Face's flat
    ``pytorch_model.bin``: the state dict alone, so no alpha or extra entries. Other suffixes (``.pt``,
    ``.pth``, ``.ckpt``) store a nanoGPT-style checkpoint dict ``{'model': state_dict, **extra, 'lora_ckpt': meta}``.
    The alpha is recorded so later merges need not be told, and so is each LoRA module's kind in the layouts
    whose keys do not tell linear modules and embeddings apart (loralib, minLoRA, nanoGPT's fork). The rules for
    the path (what may be replaced, permissions, leftovers of interrupted runs) are :class:`~lora_ckpt.output.Output`'s.

    Args:
        path: the file to write.
        state_dict: the tensors to store.
        alpha: the LoRA alpha (float or per module) to record.
        extra: other checkpoint entries (``optimizer``, ``model_args`` …); for safetensors only
            ``model_args`` (JSON-able) can be kept, anything else is an error.
        overwrite: replace an existing file (the old one stays intact until the new one is complete).
        kinds: module -> ``"linear"``/``"embedding"`` (``"*"``: every module whose square factors fit both), as
            :func:`~lora_ckpt.detect_layout` takes it, for the modules whose shapes cannot tell; recorded.

    Raises:
        CheckpointFileError: the file exists and ``overwrite`` is False, an unknown suffix, entries that
            safetensors cannot hold, or the write failed (the target is then left as it was).
    """
    p = Path(path)
    if p.suffix not in FILE_SUFFIXES:
        raise CheckpointFileError(f"{p}: unknown suffix {p.suffix!r}; use .safetensors or .pt")
    rest = sorted(k for k in (extra or {}) if k != "model_args")
    if p.suffix == ".safetensors" and rest:
        raise CheckpointFileError(f"{p}: safetensors cannot hold {rest}; write a .pt file to keep them, or leave them out")
    _check_flat(p, alpha, extra)
    out = Output.prepare(p, overwrite=overwrite, folder=False)
    with out.writing() as tmp:
        write_checkpoint(tmp, state_dict, alpha=alpha, extra=extra, suffix=p.suffix, kinds=kinds)
    return p


def write_checkpoint(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: float | Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    suffix: str | None = None,
    kinds: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` into the file ``path`` as :func:`save_checkpoint` stores it, in place.

    For writers that already hold a staging path from an :class:`~lora_ckpt.output.Output` (files
    inside a folder being assembled); ``suffix`` picks the format when the staging name has none;
    ``kinds`` settles the modules whose kinds the shapes cannot tell (see :func:`file_meta`).
    """
    fmt = suffix or path.suffix
    extra = dict(extra or {})
    if fmt == ".safetensors":
        rest = sorted(k for k in extra if k != "model_args")
        if rest:
            raise CheckpointFileError(
                f"{path}: safetensors cannot hold {rest}; write a .pt file to keep them, or leave them out"
            )
        meta = file_meta(state_dict, alpha, model_args=extra.get("model_args"), kinds=kinds)
        aliases = {alias: group[0] for group in meta.tied for alias in group[1:]}
        meta = replace(meta, aliases=aliases, order=tuple(state_dict))
        check_safetensors_keys(state_dict, path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k not in aliases}
        header = meta.to_header()
        try:
            save_file(tensors, str(path), metadata=header)
        except (TypeError, ValueError, RuntimeError) as e:
            raise CheckpointFileError(f"{path}: cannot write safetensors ({e}); is the disk full?") from None
    else:
        _check_flat(path, alpha, extra, suffix=fmt)
        meta = file_meta(state_dict, alpha, kinds=kinds)
        content = dict(state_dict) if fmt == ".bin" else {"model": dict(state_dict), **extra, META_KEY: meta.to_dict()}
        try:
            torch.save(content, path)
        except RuntimeError as e:  # torch's zip writer reports a full disk this way
            raise CheckpointFileError(f"{path}: cannot write ({str(e).splitlines()[0]}); is the disk full?") from None


def _check_flat(path: Path, alpha: object, extra: Mapping[str, Any] | None, *, suffix: str | None = None) -> None:
    """A ``.bin`` file is Hugging Face's flat state dict: refuse what it cannot record rather than drop it."""
    if (suffix or path.suffix) != ".bin":
        return
    lost = (["the alpha"] if alpha is not None else []) + sorted(map(str, extra or {}))
    if lost:
        raise CheckpointFileError(
            f"{path}: a .bin file is Hugging Face's flat state dict (pytorch_model.bin), with no place for "
            f"{', '.join(lost)}; write .pt to keep them, or .safetensors (which records the alpha)"
        )
