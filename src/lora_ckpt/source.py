"""What lora_ckpt may read, and how: the one owner of every input.

A :class:`Source` is one input opened once per command: a ``.safetensors`` file, a torch pickle
(``.pt``/``.pth``/``.bin``/``.ckpt``, loaded only with ``weights_only=True``), a Hugging Face model folder
(single file or sharded with an index) or a PEFT adapter folder. Every input is hostile until checked:

- safetensors headers are parsed and validated here (sizes, JSON shape, dtypes, shapes, offsets that
  tile the data) before any byte of data is read; lora_ckpt's own metadata is validated by
  :class:`~lora_ckpt.filemeta.FileMeta`;
- every path read from a file (an index's shard names, an adapter folder's weights) stays inside the
  folder it came from, after resolving symbolic links (a Hugging Face cache snapshot may point into its
  own ``blobs`` folder);
- a key in two shards, a key the index names that its shard does not hold, and a key a shard holds that
  the index does not list are errors naming the key and the files.

Shapes and dtypes come from the headers; tensor data is read on demand by row ranges with positioned
reads, so resident memory does not grow with the file.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import torch

from lora_ckpt.checkpoint import Checkpoint, checkpoint_from_dict
from lora_ckpt.checks import unique_keys
from lora_ckpt.errors import CheckpointFileError, LayoutError, LoraCkptError, UnsafeCheckpointError, brief
from lora_ckpt.filemeta import FileMeta
from lora_ckpt.hub import local_path
from lora_ckpt.output import PathLike

if TYPE_CHECKING:
    from lora_ckpt.formats.dcp import DcpReader

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "SAFETENSORS_DTYPES",
    "Entry",
    "Source",
    "contained",
    "read_json",
    "read_safetensors_header",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")

#: safetensors dtype names and the torch dtypes they hold.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: its file, dtype, shape, the key the file stores it under, and its data offset.

    ``offset`` is the absolute file offset of a safetensors tensor's bytes, None for a tensor loaded from a pickle.
    """

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    stored: str
    offset: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """Return the JSON object in ``path``; one clear error for unreadable, non-UTF-8, invalid or non-object JSON."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointFileError(f"{path}: cannot read the {what} ({e.strerror})") from None
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFileError(f"{path}: the {what} is not valid UTF-8 JSON ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise CheckpointFileError(f"{path}: the {what} is a JSON {type(value).__name__}, not an object")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (after links); False where the system cannot say (a name too long …)."""
    try:
        return path.is_file()
    except OSError:
        return False


def contained(folder: Path, name: object, *, what: str) -> Path:
    """Return ``folder / name`` if it stays inside ``folder`` after resolving links; raise naming ``what`` otherwise.

    Absolute names, ``..`` and links that lead out are refused. A Hugging Face cache snapshot
    (``…/snapshots/<rev>/``) may point into its repository's ``blobs`` folder, as the cache does.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointFileError(f"{folder}: {what} names {brief(name)}, which is not a file name")
    rel = PurePosixPath(name)
    if rel.is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).is_absolute() or ".." in rel.parts:
        raise CheckpointFileError(f"{folder}: {what} names {brief(name)}, outside the folder; refusing to read it")
    path = folder / rel
    try:
        real, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as e:  # a link loop (RuntimeError before Python 3.13), a name too long
        raise CheckpointFileError(
            f"{folder}: {what} {brief(name)} cannot be resolved ({_first_line(e)}); refusing to read it"
        ) from None
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(real == r or r in real.parents for r in roots):
        raise CheckpointFileError(
            f"{folder}: {what} {brief(name)} is a link to {real}, outside the folder; refusing to read it"
        )
    return path


def read_safetensors_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Return the tensors (key -> :class:`Entry`) and the ``__metadata__`` of a safetensors file, validated.

    Checks what the format requires: the header length fits the file, the header is a JSON object of
    entries with a known dtype, a shape of non-negative integers and ``data_offsets`` that match the
    shape and tile the data section exactly; the metadata is an object of strings.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFileError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointFileError(
                    f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a file of {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointFileError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFileError(f"{path}: corrupt safetensors header ({_first_line(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFileError(f"{path}: corrupt safetensors header (__metadata__ is not an object of strings)")
    data_start, data_size = 8 + n, size - 8 - n
    entries: dict[str, Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        entry, span = _entry(path, key, info, data_start)
        entries[key] = entry
        spans.append((*span, key))
    spans.sort()
    end = 0
    for begin, stop, key in spans:
        if begin != end:
            raise CheckpointFileError(f"{path}: corrupt safetensors header ({key}'s data starts at {begin}, not {end})")
        end = stop
    if end != data_size:
        raise CheckpointFileError(
            f"{path}: corrupt or truncated safetensors file (the header describes {end} bytes of data, the file has {data_size})"
        )
    return entries, metadata


def _entry(path: Path, key: str, info: object, data_start: int) -> tuple[Entry, tuple[int, int]]:
    def bad(why: str) -> CheckpointFileError:
        return CheckpointFileError(f"{path}: corrupt safetensors header ({key}: {why})")

    if not isinstance(info, dict):
        raise bad("not an object")
    name = info.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise bad(f"dtype {brief(name)} is not one lora_ckpt reads")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {brief(shape)} is not a list of non-negative integers")
    elements = 1
    for d in shape:  # torch's strides count a 0 as 1: (0, 2**62, 4) cannot be made either
        elements *= max(d, 1)
        if elements >= 2**63:
            raise bad(f"shape {brief(shape)} is too large for a tensor")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise bad(f"data_offsets {brief(offsets)} is not two non-negative integers")
    begin, stop = offsets
    if stop - begin != math.prod(shape) * dtype.itemsize:
        raise bad(f"data_offsets {brief(offsets)} do not hold a {name} tensor of shape {brief(shape)}")
    return Entry(path, dtype, tuple(shape), key, data_start + begin), (begin, stop)


class Source:
    """One input, opened once: its tensors' entries, its recorded metadata, and reads on demand.

    Make one with :meth:`open`; close it (or use it as a context manager) to release its file handles.
    ``kind`` is ``"safetensors"``, ``"pickle"``, ``"folder"`` (a model folder, sharded or not), ``"peft"``
    (an adapter folder, whose validated ``adapter_config.json`` is ``config``) or ``"dcp"`` (a
    ``torch.distributed.checkpoint`` directory, read without a process group by ``reader``, a
    :class:`~lora_ckpt.formats.dcp.DcpReader`).
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        files: list[Path],
        entries: dict[str, Entry],
        *,
        meta: FileMeta | None = None,
        loaded: Checkpoint | None = None,
        config: dict[str, Any] | None = None,
        reader: DcpReader | None = None,
    ) -> None:
        self.path, self.kind, self.files, self.entries = path, kind, files, entries
        self.meta, self.loaded, self.config = meta, loaded, config
        self.reader = reader  # a DCP directory's reader (kind "dcp")
        self._fds: dict[Path, int] = {}
        if meta is not None:  # every file's entries: the kinds of a sharded model may name modules in any shard
            meta.check_kinds({k: e.shape for k, e in entries.items()}, where=path)

    @property
    def model_config(self) -> dict[str, Any] | None:
        """A model folder's ``config.json`` (validated JSON object), or None where there is none."""
        if self.kind != "folder" or not (self.path / "config.json").is_file():
            return None
        return read_json(contained(self.path, "config.json", what="the model config"), what="model config")

    @classmethod
    def open(cls, path: PathLike) -> Source:
        """Open the input at ``path`` (file, model folder or PEFT adapter folder) and check everything but its data.

        A Hugging Face Hub repo id (``org/name``, ``hf://org/name@revision``) opens its snapshot in the Hub
        cache (see :mod:`lora_ckpt.hub`; needs the ``[hub]`` extra).

        Raises:
            CheckpointFileError: missing, unreadable, corrupt or truncated, or a path that leads outside its folder.
            UnsafeCheckpointError: a pickle that would run code to load.
            LayoutError: a pickle that holds no state dict.
        """
        p = local_path(path)
        if p.is_dir():
            return cls._open_folder(p)
        if not p.exists():
            raise CheckpointFileError(f"{p}: no such file or folder")
        if not p.is_file():
            raise CheckpointFileError(f"{p}: not a regular file")
        if p.name in ADAPTER_WEIGHTS and (p.parent / ADAPTER_CONFIG).is_file():
            return cls._open_folder(p.parent)  # an adapter file named directly: its config beside it rules
        kind, entries, meta, loaded = _open_file(p)
        return cls(p, kind, [p], entries, meta=meta, loaded=loaded)

    @classmethod
    def _open_folder(cls, folder: Path) -> Source:
        if (folder / ".metadata").is_file():  # a torch.distributed.checkpoint directory
            from lora_ckpt.formats.dcp import DcpReader  # it builds on this module's Entry and contained()

            reader = DcpReader.open(folder)
            return cls(folder, "dcp", reader.files, reader.entries(), reader=reader)
        has_adapter = any((folder / n).is_file() for n in ADAPTER_WEIGHTS)
        has_model = any((folder / n).is_file() for n in (*SINGLE, *INDEXES))
        if (folder / ADAPTER_CONFIG).is_file() and has_adapter and has_model:
            raise CheckpointFileError(
                f"{folder}: holds both a PEFT adapter ({ADAPTER_CONFIG}) and model weights; give the model and the "
                "adapter as separate folders"
            )
        if (folder / ADAPTER_CONFIG).is_file() and not (has_model and not has_adapter):
            config = read_json(contained(folder, ADAPTER_CONFIG, what="the adapter config"), what="adapter config")
            name = next((n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
            if name is None:
                raise CheckpointFileError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")
            f = contained(folder, name, what="the adapter weights")
            _, entries, meta, loaded = _open_file(f)
            return cls(folder, "peft", [f], entries, meta=meta, loaded=loaded, config=config)
        for index in INDEXES:
            if (folder / index).is_file():
                return cls._open_sharded(folder, index)
        for name in SINGLE:
            if (folder / name).is_file():
                f = contained(folder, name, what="the weights file")
                _, entries, meta, loaded = _open_file(f)
                return cls(folder, "folder", [f], entries, meta=meta, loaded=loaded)
        raise CheckpointFileError(f"{folder}: no {', '.join(SINGLE + INDEXES)} or {ADAPTER_CONFIG} in this folder")

    @classmethod
    def _open_sharded(cls, folder: Path, index: str) -> Source:
        index_path = contained(folder, index, what="the index")
        raw = read_json(index_path, what="index")
        weight_map = raw.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFileError(f"{index_path}: not a valid index (no 'weight_map' object of key -> file name)")
        shards = {name: contained(folder, name, what=f"{index} shard") for name in sorted(set(weight_map.values()))}
        missing = [n for n, f in shards.items() if not _is_file(f)]
        if missing:
            raise CheckpointFileError(f"{index_path}: names shard(s) {brief(missing[:3])} that are not in {folder}")
        entries: dict[str, Entry] = {}
        metas: list[FileMeta] = []
        loaded: dict[str, torch.Tensor] = {}
        for name, f in shards.items():
            _, file_entries, meta, ckpt = _open_file(f)
            if meta is not None:
                metas.append(meta)
            if ckpt is not None:
                loaded.update(ckpt.state_dict)
            for key, entry in file_entries.items():
                if key in entries:
                    raise CheckpointFileError(
                        f"{folder}: {key} is in two shards, {entries[key].file.name} and {name}; the checkpoint is "
                        "ambiguous: remove the stale shard or fix the index"
                    )
                listed = weight_map.get(key)
                if listed is None:
                    raise CheckpointFileError(f"{index_path}: does not list {key}, which {name} holds; fix the index")
                if listed != name:
                    raise CheckpointFileError(f"{index_path}: lists {key} in {listed}, but {name} holds it; fix the index")
                entries[key] = entry
        absent = [k for k in weight_map if k not in entries]
        if absent:
            raise CheckpointFileError(
                f"{index_path}: lists {brief(absent[:3])} in {weight_map[absent[0]]}, which does not hold "
                f"{'it' if len(absent) == 1 else 'them'}; the shards are incomplete or the index is stale"
            )
        meta = metas[0] if metas else None
        if meta is not None:
            meta.check_keys(entries, where=index_path)
        ckpt = Checkpoint(loaded) if loaded else None
        return cls(folder, "folder", list(shards.values()), entries, meta=meta, loaded=ckpt)

    # --- what the input holds -------------------------------------------------------------------

    def paths(self) -> list[Path]:
        """The path given and every file read from it (resolved by outputs, so none is written over)."""
        return [self.path, *self.files]

    def keys(self) -> list[str]:
        """Every key, aliases of tied tensors included, in the recorded order where there is one."""
        return self.meta.ordered(list(self.entries)) if self.meta is not None else list(self.entries)

    def aliases(self) -> dict[str, str]:
        """Keys that hold the same tensor as another key (tied weights): alias -> the key stored."""
        if self.loaded is not None and self.kind == "pickle":
            from lora_ckpt.layout import tied_groups

            return {alias: group[0] for group in tied_groups(self.loaded.state_dict) for alias in group[1:]}
        return {k: e.stored for k, e in self.entries.items() if e.stored != k}

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """``meta`` tensors of every shape and dtype, in :meth:`keys` order, for planning."""
        return {k: torch.empty(self.entries[k].shape, dtype=self.entries[k].dtype, device="meta") for k in self.keys()}

    def recorded(self) -> Checkpoint:
        """What the input records beside its tensors, as a tensor-less :class:`Checkpoint`: alpha, module kinds,
        ``model_args``, extra entries (its :meth:`~lora_ckpt.Checkpoint.detect` gives :meth:`meta_tensors`' layout)."""
        if self.loaded is not None and self.kind == "pickle":
            base = self.loaded
            return Checkpoint({}, alpha=base.alpha, alpha_source=base.alpha_source, extra=dict(base.extra),
                              path=self.path, metadata=base.metadata, kinds=dict(base.kinds))
        if self.reader is not None:
            return Checkpoint({}, extra=self.reader.extra(), path=self.path).record(None)
        model_args = self.meta.model_args if self.meta is not None else None
        return Checkpoint({}, extra={"model_args": model_args} if model_args else {}, path=self.path).record(self.meta)

    # --- reading ----------------------------------------------------------------------------------

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``key`` (a new CPU tensor), or its rows ``start:stop`` (first dimension)."""
        if self.reader is not None:
            return self.reader.read(key, start, stop)
        entry = self.entries[key]
        if entry.offset is None:
            assert self.loaded is not None
            t = self.loaded.state_dict[entry.stored]
            return t if start is None else t[start:stop]
        a, b = (0, entry.shape[0] if entry.shape else 1) if start is None else (start, stop)
        row = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        buf = torch.empty((b - a) * row, dtype=torch.uint8)  # type: ignore[operator]
        view = self.read_into(key, a, b, buf)  # type: ignore[arg-type]
        return view if start is not None else view.reshape(entry.shape)

    def read_into(self, key: str, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of ``key`` read into the uint8 buffer ``buf``; returns the typed view.

        Plain positioned reads, no memory map: resident memory does not grow with the file.
        """
        if self.reader is not None:
            return self.reader.read_into(key, start, stop, buf)
        entry = self.entries[key]
        shape = entry.shape
        row = math.prod(shape[1:]) * entry.dtype.itemsize
        n = (stop - start) * row
        view = buf[:n]
        if entry.offset is None:  # a memory-mapped torch pickle
            view.copy_(self.read(key, start, stop).contiguous().reshape(-1).view(torch.uint8))
        elif n:
            fd = self._fds.get(entry.file)
            if fd is None:
                fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
            mv, offset, done = view.numpy().data, entry.offset + start * row, 0
            while done < n:
                got = os.preadv(fd, [mv[done:]], offset + done)
                if got <= 0:
                    raise CheckpointFileError(f"{entry.file}: truncated while reading {key}")
                done += got
        typed = view.view(entry.dtype)
        return typed.view((stop - start, *shape[1:])) if shape else typed.view(())

    def load(self) -> Checkpoint:
        """Every tensor read into memory, tied keys sharing one tensor, with what the file records."""
        if self.loaded is not None and self.kind == "pickle":
            return self.loaded
        by_stored: dict[tuple[Path, str], torch.Tensor] = {}
        tensors: dict[str, torch.Tensor] = {}
        for key in self.keys():
            entry = self.entries[key]
            slot = (entry.file, entry.stored)
            if slot not in by_stored:
                by_stored[slot] = self.read(entry.stored)
            tensors[key] = by_stored[slot]
        if not tensors:
            raise LayoutError(f"{self.path}: the file holds no tensors")
        info = self.recorded()
        return Checkpoint(tensors, alpha=info.alpha, alpha_source=info.alpha_source, extra=info.extra,
                          path=self.path, metadata=info.metadata, kinds=info.kinds)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Source({str(self.path)!r}, kind={self.kind!r}, files={len(self.files)}, tensors={len(self.entries)})"


def _open_file(p: Path) -> tuple[str, dict[str, Entry], FileMeta | None, Checkpoint | None]:
    """Sniff a file's format by its content and open it: (kind, entries, lora_ckpt metadata, loaded pickle)."""
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(16)
    except IsADirectoryError:
        raise CheckpointFileError(f"{p}: is a folder, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointFileError(f"{p}: cannot read ({e.strerror})") from None
    # safetensors first: its 8-byte header length can start with 0x80, as a legacy pickle does
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= size:
        return _open_safetensors(p)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        ckpt = checkpoint_from_dict(_torch_load(p, zip_format=head.startswith(b"PK")), p)
        entries = {k: Entry(p, t.dtype, tuple(t.shape), k) for k, t in ckpt.state_dict.items()}
        meta = None
        return "pickle", entries, meta, ckpt
    if len(head) >= 9 and head[8:9] == b"{":
        return _open_safetensors(p)  # a header longer than the file: reported as truncated
    raise CheckpointFileError(f"{p}: not a safetensors file nor a torch checkpoint (it may be truncated or corrupt)")


def _open_safetensors(p: Path) -> tuple[str, dict[str, Entry], FileMeta | None, None]:
    entries, header_meta = read_safetensors_header(p)
    meta = FileMeta.from_header(header_meta, stored=entries, where=p)
    if meta is not None:
        for alias, key in meta.aliases.items():
            entries[alias] = entries[key]
        meta.check_keys(entries, where=p)
    return "safetensors", entries, meta, None


def _torch_load(p: Path, *, zip_format: bool) -> object:
    """``torch.load`` with ``weights_only=True``; every failure becomes one :class:`CheckpointFileError`."""
    try:
        if p.suffix == ".safetensors":  # torch.load would hand the name to safetensors: read the content as a pickle
            with open(p, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zip_format)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|global ([\w.]+)", str(e))
        if found or re.search(r"GLOBAL|global|class", str(e)):
            named = next(g for g in found.groups() if g) if found else None
            name = f"; it names {named}, e.g. a config class saved beside the weights" if named else ""
            allow = (f", or allow that class first: torch.serialization.add_safe_globals([{named.rsplit('.', 1)[-1]}])"
                     if named else "")
            raise UnsafeCheckpointError(
                f"{p}: refusing to load, the pickle needs code beyond tensors and plain containers "
                f"(weights_only=True rejected it{name}); re-save it as safetensors from a trusted environment, "
                "or, if you trust the file, load it yourself with torch.load(path, weights_only=False) and pass the "
                f"dict (its 'model' entry){allow}"
            ) from None
        raise CheckpointFileError(f"{p}: corrupt pickle ({_pickle_detail(e)})") from None
    except LoraCkptError:
        raise
    except MemoryError:
        raise CheckpointFileError(f"{p}: corrupt torch checkpoint (it asks for more memory than there is)") from None
    except Exception as e:  # torch.load fails in many ways on damaged files (KeyError, zip, struct, EOF …)
        raise CheckpointFileError(
            f"{p}: corrupt or truncated torch checkpoint ({type(e).__name__}: {_first_line(e)})"
        ) from None


def _pickle_detail(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Weights only", "Check the"))]
    return lines[-1] if lines else type(e).__name__

