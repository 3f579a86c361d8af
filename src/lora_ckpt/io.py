"""Reading and writing checkpoint files: ``.safetensors`` and torch pickles (``.pt``/``.pth``/``.bin``/``.ckpt``).

Pickles load only with ``weights_only=True``; every write goes to a temporary file beside the target,
renamed into place once complete, so no failure leaves a partial file and an input is never damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from packaging.version import InvalidVersion, Version
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora_ckpt._version import __version__
from lora_ckpt.errors import AlphaError, CheckpointFileError, LayoutError, UnsafeCheckpointError
from lora_ckpt.layout import Layout, _tied_groups, detect_layout

__all__ = ["Checkpoint", "PathLike", "as_checkpoint", "load_checkpoint", "save_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]

_META_KEY = "lora_ckpt"
_FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")


@dataclass
class Checkpoint:
    """A state dict with what is known about it: alpha, where it came from, and the rest of the file.

    ``extra`` holds the other entries of a checkpoint dict (``optimizer``, ``model_args``,
    ``iter_num`` …); ``alpha`` is the alpha recorded in the file (lora_ckpt metadata, or nanoGPT's
    ``model_args['lora_alpha']``), or None where the file does not say.
    """

    state_dict: dict[str, torch.Tensor]
    alpha: float | dict[str, float] | None = None
    alpha_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def resolve_alpha(self, alpha: float | Mapping[str, float] | None) -> float | Mapping[str, float] | None:
        """The alpha to merge with: ``alpha`` if given, else the recorded one; raise if they disagree."""
        if alpha is None or self.alpha is None:
            return alpha if alpha is not None else self.alpha
        if _same_alpha(alpha, self.alpha):
            return alpha
        where = f" in {self.path}" if self.path else ""
        raise AlphaError(
            f"alpha={_fmt(alpha)} conflicts with alpha {_fmt(self.alpha)} recorded{where} ({self.alpha_source}); "
            "drop the alpha argument to use the recorded value"
        )


def _same_alpha(a: float | Mapping[str, float], b: float | Mapping[str, float]) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return dict(a) == dict(b)
    if isinstance(a, Mapping):
        return all(v == b for v in a.values())
    if isinstance(b, Mapping):
        return all(v == a for v in b.values())
    return float(a) == float(b)


def _fmt(alpha: float | Mapping[str, float]) -> str:
    if isinstance(alpha, Mapping):
        values = set(alpha.values())
        return _fmt(values.pop()) if len(values) == 1 else "{per-module}"
    return f"{float(alpha):g}"


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def as_checkpoint(source: Checkpoint | Mapping[str, Any] | PathLike) -> Checkpoint:
    """Return ``source`` as a :class:`Checkpoint`: a file path, a checkpoint dict or a state dict.

    Raises:
        CheckpointFileError: the file cannot be read (see :func:`load_checkpoint`).
        LayoutError: a mapping that is neither a state dict nor holds one under ``model``/``state_dict``.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_checkpoint(source)
    if _is_state_dict(source):
        return Checkpoint(dict(source))
    return _from_dict(source, None)


def _from_dict(obj: object, path: Path | None) -> Checkpoint:
    where = f"{path}: " if path else ""
    if not isinstance(obj, Mapping):
        raise LayoutError(f"{where}expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    if _is_state_dict(obj):
        return Checkpoint(dict(obj), path=path)
    key = next((k for k in _STATE_DICT_KEYS if _is_state_dict(obj.get(k))), None)
    if key is None:
        raise LayoutError(
            f"{where}no state dict found: expected tensors at the top level or under one of "
            f"{list(_STATE_DICT_KEYS)}; found keys {sorted(map(str, obj))[:8]}"
        )
    extra = {k: v for k, v in obj.items() if k not in (key, _META_KEY)}
    meta = dict(obj.get(_META_KEY) or {})
    ckpt = Checkpoint(dict(obj[key]), extra=extra, path=path, metadata=meta)
    _read_alpha(ckpt)
    return ckpt


def _check_version(meta: Mapping[str, Any], path: Path | None) -> None:
    """Refuse metadata written by a newer lora_ckpt in a format this version does not know."""
    written = str(meta.get("lora_ckpt_version", "0"))
    try:
        newer = Version(written) > Version(__version__)
    except InvalidVersion:
        newer = True
    if newer and int(meta.get("format_version", _FORMAT_VERSION)) > _FORMAT_VERSION:
        raise CheckpointFileError(
            f"{path}: written by lora_ckpt {written} in metadata format {meta['format_version']}, which "
            f"lora_ckpt {__version__} does not read; upgrade lora-ckpt"
        )


def _read_alpha(ckpt: Checkpoint) -> None:
    _check_version(ckpt.metadata, ckpt.path)
    if ckpt.metadata.get("alpha") is not None:
        ckpt.alpha, ckpt.alpha_source = ckpt.metadata["alpha"], "lora_ckpt metadata"
        return
    model_args = ckpt.extra.get("model_args")
    if isinstance(model_args, Mapping) and model_args.get("lora_alpha") is not None:
        ckpt.alpha, ckpt.alpha_source = float(model_args["lora_alpha"]), "model_args['lora_alpha']"


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Return the checkpoint stored at ``path``; pickles are loaded with ``weights_only=True``.

    The format follows the file's content (safetensors header, torch zip or legacy pickle), not only
    its name. Tensors land on the CPU; ``.pt`` files are memory-mapped where their format allows.

    Raises:
        CheckpointFileError: missing, unreadable, corrupt or truncated file, or an unknown format.
        UnsafeCheckpointError: a pickle that would run code (or use types other than tensors and
            plain containers) to load.
        LayoutError: the file holds no state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointFileError(f"{p}: no such file")
    with open(p, "rb") as f:
        head = f.read(16)
    # safetensors first: its 8-byte header length can start with 0x80, as a legacy pickle does
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= p.stat().st_size:
        return _load_safetensors(p)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return _from_dict(_torch_load(p, zip_format=head.startswith(b"PK")), p)
    if len(head) >= 9 and head[8:9] == b"{":
        return _load_safetensors(p)  # a header longer than the file: reported as truncated
    raise CheckpointFileError(f"{p}: not a safetensors file nor a torch checkpoint (it may be truncated or corrupt)")


def _torch_load(p: Path, *, zip_format: bool) -> object:
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zip_format)
    except pickle.UnpicklingError as e:
        if re.search(r"GLOBAL|global|class", str(e)):
            raise UnsafeCheckpointError(
                f"{p}: refusing to load, the pickle needs code beyond tensors and plain containers "
                "(weights_only=True rejected it); re-save it as safetensors from a trusted environment"
            ) from None
        raise CheckpointFileError(f"{p}: corrupt pickle ({_pickle_detail(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointFileError(f"{p}: corrupt or truncated torch checkpoint ({str(e).splitlines()[0]})") from None


def _pickle_detail(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Weights only", "Check the"))]
    return lines[-1] if lines else type(e).__name__


def _load_safetensors(p: Path) -> Checkpoint:
    try:
        with safe_open(p, framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointFileError(f"{p}: corrupt or truncated safetensors file ({e})") from None
    meta = json.loads(raw_meta.get(_META_KEY, "{}"))
    for alias, key in meta.get("aliases", {}).items():
        tensors[alias] = tensors[key]  # restore tying
    extra = {"model_args": meta["model_args"]} if meta.get("model_args") else {}
    if not tensors:
        raise LayoutError(f"{p}: the file holds no tensors")
    ckpt = Checkpoint(_reorder(tensors, meta.get("order")), extra=extra, path=p, metadata=meta)
    _read_alpha(ckpt)
    return ckpt


def _reorder(tensors: dict[str, torch.Tensor], order: list[str] | None) -> dict[str, torch.Tensor]:
    if not order or set(order) != set(tensors):
        return tensors
    return {k: tensors[k] for k in order}


def _metadata(
    state_dict: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float] | None
) -> dict[str, Any]:
    try:
        layout: Layout | None = detect_layout(state_dict)
    except LayoutError:  # e.g. loralib factors of a square weight, which fit a linear module and an embedding alike
        layout = None  # saving must not need what only a merge needs: that is asked for (kinds=...) there
    meta: dict[str, Any] = {"format_version": _FORMAT_VERSION, "lora_ckpt_version": __version__,
                            "layout": layout.kind if layout is not None else None}
    if alpha is not None and (isinstance(alpha, Mapping) or layout is None):
        meta["alpha"] = dict(alpha) if isinstance(alpha, Mapping) else float(alpha)
    elif alpha is not None and layout is not None:
        meta["alpha"] = {m.name: float(alpha) for m in layout.modules if m.has_factors}
    meta["tied"] = [list(g) for g in _tied_groups(dict(state_dict))]
    return meta


def save_checkpoint(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: float | Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state_dict`` to ``path`` atomically and return the path; never leaves a partial file.

    ``.safetensors`` stores the tensors (tied tensors once, restored as tied on load) and lora_ckpt's
    metadata (layout, per-module alpha, ``model_args``). Other suffixes (``.pt``, ``.pth``, ``.ckpt``,
    ``.bin``) store a nanoGPT-style checkpoint dict ``{'model': state_dict, **extra, 'lora_ckpt': meta}``.
    The alpha is recorded so later merges need not be told.

    Args:
        path: the file to write.
        state_dict: the tensors to store.
        alpha: the LoRA alpha (float or per module) to record.
        extra: other checkpoint entries (``optimizer``, ``model_args`` …); for safetensors only
            ``model_args`` (JSON-able) can be kept, anything else is an error.
        overwrite: replace an existing file (the old one stays intact until the new one is complete).

    Raises:
        CheckpointFileError: the file exists and ``overwrite`` is False, an unknown suffix, entries that
            safetensors cannot hold, or the write failed (the target is then left as it was).
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise CheckpointFileError(f"{p}: already exists; pass overwrite=True (CLI: --force) to replace it")
    if p.suffix not in (".safetensors", *_PICKLE_SUFFIXES):
        raise CheckpointFileError(f"{p}: unknown suffix {p.suffix!r}; use .safetensors or .pt")
    meta = _metadata(state_dict, alpha)
    extra = dict(extra or {})
    if p.suffix == ".safetensors":
        rest = sorted(k for k in extra if k != "model_args")
        if rest:
            raise CheckpointFileError(
                f"{p}: safetensors cannot hold {rest}; write a .pt file to keep them, or leave them out"
            )
        if extra.get("model_args") is not None:
            meta["model_args"] = dict(extra["model_args"])
        write = lambda tmp: _write_safetensors(tmp, state_dict, meta)
    else:
        payload = {"model": dict(state_dict), **extra, _META_KEY: meta}
        write = lambda tmp: torch.save(payload, tmp)
    with _atomic_target(p) as tmp:
        write(tmp)
    return p


def _write_safetensors(tmp: Path, state_dict: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    aliases = {alias: group[0] for group in _tied_groups(dict(state_dict)) for alias in group[1:]}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if k not in aliases}
    meta = {**meta, "aliases": aliases, "order": list(state_dict)}
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", _META_KEY: json.dumps(meta)})
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointFileError(f"cannot write safetensors: {e}; is model_args JSON-serialisable?") from None


@contextlib.contextmanager
def removed_on_failure(path: PathLike) -> Iterator[None]:
    """Remove ``path`` (file or folder) if the block fails and it did not exist before: for outputs written in pairs."""
    p = Path(path)
    existed = p.exists()
    try:
        yield
    except BaseException:
        if not existed and p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise


@contextlib.contextmanager
def _atomic_target(p: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``p``; rename it onto ``p`` on success, delete it on failure."""
    if not p.parent.is_dir():
        raise CheckpointFileError(f"{p}: the folder {p.parent} does not exist")
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
