"""``torch.distributed.checkpoint`` (DCP) directories: read without a process group, write atomically.

A DCP directory holds a ``.metadata`` file (a pickle of
:class:`torch.distributed.checkpoint.metadata.Metadata`) and ``__R_N.distcp`` files, each a run of
``torch.save`` records, one per tensor chunk (a rank's shard) or non-tensor value.

Why not ``dcp.load``: torch reads ``.metadata`` with a bare ``pickle.load`` (any pickle runs code) and
loads non-tensor entries with ``torch.load(weights_only=False)``. Here ``.metadata`` is read by an
unpickler that knows only the DCP metadata classes, ``torch.Size``, dtypes and layouts (anything else is
refused, naming what the pickle asked for), and every field is then checked like user input: keys,
dtypes, shapes, chunks inside their tensor and covering it once, files inside the directory, byte
ranges inside their file. Each chunk's ``torch.save`` record is opened with ``weights_only=True`` on the
meta device (no data read) to find where its bytes start; rows are then read with positioned reads, so
resident memory is one block, not the tensor. Non-tensor values are loaded with ``weights_only=True``.

Writing goes through :class:`~lora_ckpt.output.Output` (staged beside the target, installed once
complete) with torch's own ``FileSystemWriter``; tensors are produced one at a time by a save planner, so
a streamed merge to DCP holds one tensor, not the model.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_ckpt.checkpoint import STATE_DICT_KEYS
from lora_ckpt.errors import CheckpointFileError, UnsafeCheckpointError, brief
from lora_ckpt.source import Entry, contained

__all__ = ["DCP_METADATA", "DcpReader", "DcpTensor", "is_dcp", "write_dcp"]

#: The file that marks a DCP directory.
DCP_METADATA = ".metadata"
_MAX_METADATA = 1 << 30  # 1 GiB: far above a 70B FSDP checkpoint's metadata
_MAX_VALUE = 16 << 20  # a non-tensor entry larger than this is listed, not loaded
_MAX_COVER_WORK = 1 << 22  # chunks * 2**k * (k + 1), k split dims: the cover check's work per tensor (<~7 s)

_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP, "Metadata"), (_DCP, "TensorStorageMetadata"), (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"), (_DCP, "TensorProperties"), (_DCP, "MetadataIndex"), (_DCP, "StorageMeta"),
    (_DCP, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path"),
}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}


def is_dcp(folder: Path) -> bool:
    """Whether ``folder`` is a DCP directory (it holds a ``.metadata`` file)."""
    return (folder / DCP_METADATA).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes, ``torch.Size``, dtypes and layouts; any other global is refused."""

    def __init__(self, f: io.BufferedIOBase, where: Path) -> None:
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        raise UnsafeCheckpointError(
            f"{self.where}: refusing to load, the DCP metadata pickle asks for {brief(module)}.{brief(name)}, which "
            "DCP metadata never holds (it would run code); the checkpoint is damaged or hostile: re-save it from a "
            "trusted environment"
        )


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a tensor: where it sits in the tensor, and the byte range of its ``torch.save`` record."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    start: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    """A tensor of a DCP directory: its key there (``fqn``), dtype, shape and chunks."""

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


class DcpReader:
    """A DCP directory opened without a process group: its tensors, other entries, and reads of row ranges.

    ``tensors`` maps model keys to :class:`DcpTensor` (a ``{"model": state_dict, ...}`` save, as torchtune
    writes, gives the keys inside ``model``); ``others`` names every entry set aside (optimizer state,
    non-tensor values); ``files`` are the files read. Make one with :meth:`open`.

    Example:
        >>> import tempfile, torch, torch.distributed.checkpoint as dcp, warnings
        >>> d = tempfile.mkdtemp() + "/ckpt"
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        ...     _ = dcp.save({"w": torch.arange(6.0).reshape(3, 2)}, checkpoint_id=d, no_dist=True)
        >>> with DcpReader.open(d) as r:
        ...     r.read("w", 1, 3).tolist()
        [[2.0, 3.0], [4.0, 5.0]]
    """

    def __init__(self, path: Path, tensors: dict[str, DcpTensor], others: list[str], values: dict[str, Chunk],
                 paths: dict[str, tuple[str, ...]], files: list[Path]) -> None:
        self.path, self.tensors, self.others, self.files = path, tensors, others, files
        self._values, self._paths = values, paths
        self._where: dict[Chunk, int] = {}  # chunk -> absolute offset of its data bytes
        self._fds: dict[Path, int] = {}

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> DcpReader:
        """Read and check ``folder``'s ``.metadata`` (no tensor data is read).

        Raises:
            UnsafeCheckpointError: the metadata pickle asks for anything but DCP's metadata classes.
            CheckpointFileError: unreadable or inconsistent metadata, a chunk file missing or too short,
                a path leading outside the folder, transformed (compressed) records.
        """
        folder = Path(folder)
        meta = _read_metadata(folder)
        files: dict[str, Path] = {}
        sizes: dict[Path, int] = {}

        def place(info: object, fqn: str) -> tuple[Path, int, int]:
            name = getattr(info, "relative_path", None)
            start, length = getattr(info, "offset", None), getattr(info, "length", None)
            if not (type(start) is int and type(length) is int and start >= 0 and length > 0):
                raise _bad(folder, f"{fqn}: storage entry {brief(info)} has no valid byte range")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointFileError(
                    f"{folder}: {fqn} is stored transformed ({brief(info.transform_descriptors)}, e.g. compressed); "  # type: ignore[attr-defined]
                    "lora_ckpt reads plain DCP records only: save without extensions"
                )
            if not isinstance(name, str):
                raise _bad(folder, f"{fqn}: storage entry {brief(info)} names no file")
            if name not in files:
                f = contained(folder, name, what=f"{DCP_METADATA} entry for {fqn}")
                try:
                    sizes[f] = f.stat().st_size
                except OSError:
                    raise CheckpointFileError(
                        f"{folder}: {DCP_METADATA} names {brief(name)} (holding {fqn}), which is not in the folder; "
                        "the checkpoint is incomplete: copy every .distcp file"
                    ) from None
                files[name] = f
            f = files[name]
            if start + length > sizes[f]:
                raise CheckpointFileError(
                    f"{f}: truncated ({sizes[f]} bytes; {DCP_METADATA} places {fqn} at bytes {start}..{start + length})"
                )
            return f, start, length

        storage = _storage_index(folder, meta)
        paths = _planner_paths(meta)
        group = _model_group(meta.state_dict_metadata, paths)
        tensors: dict[str, DcpTensor] = {}
        values: dict[str, Chunk] = {}
        others: list[str] = []
        for fqn, item in meta.state_dict_metadata.items():
            if not isinstance(fqn, str):
                raise _bad(folder, f"key {brief(fqn)} is not a string")
            in_model = group is None or paths.get(fqn, (fqn,))[0] == group
            name = fqn[len(group) + 1:] if group is not None and in_model else fqn
            if type(item).__name__ == "BytesStorageMetadata":
                f, start, length = place(storage.get((fqn, None)), fqn)
                values[fqn] = Chunk((), (), f, start, length)
                others.append(fqn)
                continue
            if type(item).__name__ != "TensorStorageMetadata":
                raise _bad(folder, f"{fqn}: entry of type {type(item).__name__}, not a tensor or bytes entry")
            tensor = _tensor(folder, fqn, item, storage, place)
            if in_model and paths.get(fqn, ("",))[0] != "optimizer":
                tensors[name] = tensor
            else:
                others.append(fqn)
        if not tensors:
            raise CheckpointFileError(f"{folder}: the DCP checkpoint holds no model tensors (entries: "
                                      f"{brief(sorted(others)[:6])})")
        return cls(folder, tensors, others, values, paths, [folder / DCP_METADATA, *sorted(set(files.values()))])

    # --- what it holds ----------------------------------------------------------------------------

    def entries(self) -> dict[str, Entry]:
        """Each model tensor as a :class:`~lora_ckpt.source.Entry` (its first chunk's file; no single offset)."""
        return {k: Entry(t.chunks[0].file if t.chunks else self.path, t.dtype, t.shape, k)
                for k, t in self.tensors.items()}

    def extra(self) -> dict[str, Any]:
        """The non-tensor entries, loaded with ``weights_only=True`` and nested as they were saved.

        An entry larger than 16 MiB, or one ``weights_only`` refuses, is left out (still listed in ``others``).
        """
        out: dict[str, Any] = {}
        for fqn, chunk in self._values.items():
            if chunk.length > _MAX_VALUE:
                continue
            try:
                with _Window(chunk.file, chunk.start, chunk.length) as w:
                    value = torch.load(w, map_location="cpu", weights_only=True)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - a value weights_only refuses, or a damaged record: left out
                continue
            path = self._paths.get(fqn, (fqn,))
            node = out
            if all(isinstance(p, str) for p in path):
                *parents, last = path
                if parents and parents[0] in STATE_DICT_KEYS:
                    continue
                for p in parents:
                    nxt = node.setdefault(p, {})
                    if not isinstance(nxt, dict):
                        break
                    node = nxt
                else:
                    node[last] = value
                    continue
            out[fqn] = value
        return out

    # --- reading ------------------------------------------------------------------------------------

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``key`` (a new CPU tensor), or its rows ``start:stop`` (first dimension)."""
        t = self.tensors[key]
        a, b = (0, t.shape[0] if t.shape else 1) if start is None else (start, stop if stop is not None else t.shape[0])
        row = math.prod(t.shape[1:]) * t.dtype.itemsize
        view = self.read_into(key, a, b, torch.empty((b - a) * row, dtype=torch.uint8))
        return view if start is not None else view.reshape(t.shape)

    def read_into(self, key: str, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of ``key`` read into the uint8 buffer ``buf``; returns the typed view.

        Chunks that span whole rows (FSDP's ``Shard(0)``, a single-process save) are read straight into
        ``buf``; a chunk narrower than the tensor (``Shard(1)``) is read and copied into its columns.
        """
        t = self.tensors[key]
        shape, item = t.shape, t.dtype.itemsize
        row_elems = math.prod(shape[1:])
        n = (stop - start) * row_elems * item
        raw = buf[:n]
        out = raw.view(t.dtype)
        out = out.view((stop - start, *shape[1:])) if shape else out.view(())
        if not shape:
            self._pread(t, t.chunks[0], 0, raw)
            return out
        for chunk in t.chunks:
            c0, cn = chunk.offsets[0], chunk.sizes[0]
            a, b = max(start, c0), min(stop, c0 + cn)
            if a >= b or math.prod(chunk.sizes) == 0:
                continue
            chunk_row = math.prod(chunk.sizes[1:]) * item
            if tuple(chunk.sizes[1:]) == tuple(shape[1:]):  # whole rows: straight into place
                self._pread(t, chunk, (a - c0) * chunk_row, raw[(a - start) * row_elems * item:(b - start) * row_elems * item])
            else:
                part = torch.empty((b - a) * chunk_row, dtype=torch.uint8)
                self._pread(t, chunk, (a - c0) * chunk_row, part)
                where = (slice(a - start, b - start), *(slice(o, o + s) for o, s in zip(chunk.offsets[1:], chunk.sizes[1:])))
                out[where] = part.view(t.dtype).view((b - a, *chunk.sizes[1:]))
        return out

    def _pread(self, t: DcpTensor, chunk: Chunk, offset: int, dst: torch.Tensor) -> None:
        """Bytes ``offset:offset+len(dst)`` of the chunk's data into ``dst``."""
        base = self._where.get(chunk)
        if base is None:
            base = self._where[chunk] = _data_offset(t, chunk)
        fd = self._fds.get(chunk.file)
        if fd is None:
            fd = self._fds[chunk.file] = os.open(chunk.file, os.O_RDONLY)
        mv, pos, done = dst.numpy().data, base + offset, 0
        while done < len(mv):
            got = os.preadv(fd, [mv[done:]], pos + done)
            if got <= 0:
                raise CheckpointFileError(f"{chunk.file}: truncated while reading {t.fqn}")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> DcpReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DcpReader({str(self.path)!r}, tensors={len(self.tensors)}, others={len(self.others)})"


def _bad(folder: Path, why: str) -> CheckpointFileError:
    return CheckpointFileError(f"{folder / DCP_METADATA}: corrupt DCP metadata ({why})")


def _read_metadata(folder: Path) -> Any:
    path = folder / DCP_METADATA
    try:
        size = path.stat().st_size
        if size > _MAX_METADATA:
            raise _bad(folder, f"{size} bytes, more than DCP metadata ever needs")
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f, path).load()  # type: ignore[arg-type]
    except (UnsafeCheckpointError, CheckpointFileError):
        raise
    except OSError as e:
        raise CheckpointFileError(f"{path}: cannot read ({e.strerror})") from None
    except RecursionError:
        raise _bad(folder, "nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways (EOF, struct, Type, Value …)
        raise _bad(folder, f"{type(e).__name__}: {brief(str(e))}") from None
    if type(meta).__name__ != "Metadata" or type(meta).__module__ != _DCP:
        raise _bad(folder, f"a pickled {type(meta).__name__}, not DCP Metadata")
    if not isinstance(getattr(meta, "state_dict_metadata", None), dict):
        raise _bad(folder, "no state_dict_metadata mapping")
    return meta


def _storage_index(folder: Path, meta: Any) -> dict[tuple[str, tuple[int, ...] | None], object]:
    """``storage_data`` as (key, chunk offsets or None) -> its storage entry."""
    raw = getattr(meta, "storage_data", None)
    if not isinstance(raw, dict):
        raise _bad(folder, "no storage_data mapping (not saved by a FileSystemWriter?)")
    index: dict[tuple[str, tuple[int, ...] | None], object] = {}
    for k, v in raw.items():
        fqn, offset = getattr(k, "fqn", None), getattr(k, "offset", None)
        if not isinstance(fqn, str) or not (offset is None or isinstance(offset, tuple)):
            raise _bad(folder, f"storage_data key {brief(k)}")
        index[(fqn, None if offset is None else tuple(offset))] = v
    return index


def _planner_paths(meta: Any) -> dict[str, tuple[str, ...]]:
    """How each flat key was nested in the saved dict (DCP's ``planner_data``); {} where it is not recorded."""
    raw = getattr(meta, "planner_data", None)
    if not isinstance(raw, dict):
        return {}
    ok = all(isinstance(k, str) and isinstance(v, tuple) and v and all(isinstance(p, (str, int)) for p in v)
             for k, v in raw.items())
    return {k: tuple(map(str, v)) for k, v in raw.items()} if ok else {}


def _model_group(items: Mapping[str, object], paths: Mapping[str, tuple[str, ...]]) -> str | None:
    """The top-level entry that holds the model's state dict (``model`` …), where the save nested it; else None."""
    firsts = {paths[k][0] for k, v in items.items()
              if k in paths and len(paths[k]) > 1 and type(v).__name__ == "TensorStorageMetadata"}
    return next((g for g in STATE_DICT_KEYS if g in firsts), None)


def _ints(value: object) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list)) and all(type(d) is int and d >= 0 for d in value):
        return tuple(value)
    return None


def _tensor(folder: Path, fqn: str, item: Any, storage: Mapping[tuple[str, tuple[int, ...] | None], object],
            place: Callable[[object, str], tuple[Path, int, int]]) -> DcpTensor:
    """One tensor entry, checked: dtype, shape, chunks inside the tensor covering it once, each chunk's record."""
    props = getattr(item, "properties", None)
    dtype = getattr(props, "dtype", None)
    if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values():
        raise _bad(folder, f"{fqn}: dtype {brief(dtype)} is not one lora_ckpt reads")
    shape = _ints(getattr(item, "size", None))
    if shape is None or math.prod(max(d, 1) for d in shape) >= 2**63:
        raise _bad(folder, f"{fqn}: shape {brief(getattr(item, 'size', None))} is not a list of sizes")
    raw_chunks = getattr(item, "chunks", None)
    if not isinstance(raw_chunks, list) or not raw_chunks:
        raise _bad(folder, f"{fqn}: no chunks")
    chunks: list[Chunk] = []
    for c in raw_chunks:
        offsets, sizes = _ints(getattr(c, "offsets", None)), _ints(getattr(c, "sizes", None))
        if offsets is None or sizes is None or len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise _bad(folder, f"{fqn}: chunk at {brief(offsets)} of size {brief(sizes)} does not fit the shape "
                               f"{brief(list(shape))}")
        f, start, length = place(storage.get((fqn, offsets)), fqn)
        chunks.append(Chunk(offsets, sizes, f, start, length))
    problem = _cover_problem(shape, chunks)
    if problem is not None:
        raise _bad(folder, f"{fqn}: {problem}")
    return DcpTensor(fqn, dtype, shape, tuple(sorted(chunks, key=lambda c: c.offsets)))


def _cover_problem(shape: tuple[int, ...], chunks: list[Chunk]) -> str | None:
    """Why ``chunks`` (inside ``shape``) do not hold every element exactly once, naming one such element; else None.

    Exact for any layout (grids, uneven or brick-like splits) in O(n * 2**k), k the dimensions some chunk
    splits: a box's indicator is the signed sum of orthant steps at its 2**k corners (+ where an even number
    of its coordinates are upper bounds), so the chunks tile the tensor exactly when their signed corners
    add up to the tensor's own. Where they do not, the lexicographically first differing corner ``q`` is
    an element held ``1 + difference`` times: every corner below it agrees, and both sides vanish outside.
    """
    total, boxes = math.prod(shape), [c for c in chunks if math.prod(c.sizes)]  # empty chunks hold nothing
    covered = sum(math.prod(c.sizes) for c in boxes)
    if not total:
        return None  # chunks fit the shape, so none holds anything either
    split = [d for d in range(len(shape)) if any(c.offsets[d] or c.sizes[d] != shape[d] for c in boxes)]
    if (len(boxes) << len(split)) * (len(split) + 1) > _MAX_COVER_WORK:
        return (f"its {len(boxes)} chunks split {len(split)} dimensions: too many corners ({len(boxes)} * "
                f"2**{len(split)}) to check that they hold each element once; re-save with fewer chunks")
    corners = [(bits, -1 if sum(bits) % 2 else 1) for bits in itertools.product((False, True), repeat=len(split))]
    signed: dict[tuple[int, ...], int] = {}
    signed_boxes = [(c.offsets, tuple(o + s for o, s in zip(c.offsets, c.sizes)), 1) for c in boxes]
    for offsets, ends, box_sign in [*signed_boxes, ((0,) * len(shape), shape, -1)]:  # chunks minus the whole
        lo, hi = [offsets[d] for d in split], [ends[d] for d in split]
        for bits, sign in corners:
            p = tuple(h if b else a for b, a, h in zip(bits, lo, hi))
            signed[p] = signed.get(p, 0) + box_sign * sign
    wrong = [p for p, v in signed.items() if v]
    if not wrong:
        return None
    first = min(wrong)
    held, at = 1 + signed[first], [0] * len(shape)
    for d, i in zip(split, first):
        at[d] = i
    if held == 0:
        return (f"its chunks cover {covered} of {total} elements and none holds the element at {brief(tuple(at))}; "
                "a rank's file is missing from the metadata")
    return (f"its chunks overlap: {held} hold the element at {brief(tuple(at))} (they add up to {covered} of its "
            f"{total} elements)")


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes ``start:start+length`` of a file (one ``torch.save`` record)."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        super().__init__()
        self.f = open(path, "rb")  # noqa: SIM115 - closed with the window
        self.start, self.length, self.pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, {0: offset, 1: self.pos + offset, 2: self.length + offset}[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got or 0
        return got or 0

    def close(self) -> None:
        self.f.close()
        super().close()


def _data_offset(t: DcpTensor, chunk: Chunk) -> int:
    """Where the chunk's data bytes start in its file, after checking its record holds exactly that chunk.

    The record is opened as ``torch.load(weights_only=True)`` would open it, on the meta device: no data
    is read, and a record that would need code to load is refused.
    """
    where = f"{chunk.file}: the record of {t.fqn} at byte {chunk.start}"
    try:
        with _Window(chunk.file, chunk.start, chunk.length) as w:
            if w.read(4) != b"PK\x03\x04":
                raise CheckpointFileError(f"{where} is not a torch.save record (saved in another serialization "
                                          "format?); lora_ckpt reads DCP's default torch.save records")
            w.seek(0)
            meta = torch.load(w, map_location="meta", weights_only=True)  # type: ignore[arg-type]
            w.seek(0)
            with zipfile.ZipFile(w) as z:
                infos = z.infolist()
                data = [i for i in infos if i.filename.split("/")[-2:-1] == ["data"]]
                order = [i for i in infos if i.filename.endswith("/byteorder")]
                byteorder = z.read(order[0]).decode() if order else "little"
                if len(data) != 1:
                    raise CheckpointFileError(f"{where} holds {len(data)} storages, not one tensor's")
                info = data[0]
                w.seek(info.header_offset)
                head = w.read(30)
    except CheckpointFileError:
        raise
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{where}: refusing to load, weights_only=True rejected it ({brief(str(e))})") from None
    except Exception as e:  # noqa: BLE001 - torch.load and zipfile fail in many ways on damaged bytes
        raise CheckpointFileError(f"{where} is corrupt ({type(e).__name__}: {brief(str(e))})") from None
    nbytes = math.prod(chunk.sizes) * t.dtype.itemsize
    if not isinstance(meta, torch.Tensor) or meta.dtype != t.dtype or tuple(meta.shape) != chunk.sizes:
        got = f"a {meta.dtype} tensor of shape {list(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise CheckpointFileError(f"{where} holds {got}; the metadata says {t.dtype} {list(chunk.sizes)}")
    if not meta.is_contiguous() or meta.storage_offset() != 0 or byteorder != "little":
        raise CheckpointFileError(f"{where} is not a plain little-endian contiguous tensor; re-save it")
    if info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes or head[:4] != b"PK\x03\x04":
        raise CheckpointFileError(f"{where} stores its data compressed or short")
    begin = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    if begin + nbytes > chunk.length:
        raise CheckpointFileError(f"{where} is truncated")
    return chunk.start + begin


def write_dcp(
    folder: Path,
    shapes: Mapping[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor],
) -> None:
    """Write a DCP checkpoint into the (staged, empty) ``folder``: one tensor per key, made when it is written.

    ``shapes`` gives each key's ``meta`` tensor (shape and dtype, in order); ``produce(key)`` returns the
    tensor itself, called once per key while the file is written, so only one is held at a time. Runs in
    this process alone (``no_dist``), with no process group. Use it through an
    :class:`~lora_ckpt.output.Output`, which installs ``folder`` once complete.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class _Lazy(DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> torch.Tensor:
            key = write_item.index.fqn
            t = produce(key)
            want = shapes[key]
            if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                raise CheckpointFileError(f"{key}: produced {t.dtype} {list(t.shape)}, planned {want.dtype} "
                                          f"{list(want.shape)}")
            return t.detach().to("cpu").contiguous()

    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(dict(shapes), storage_writer=dcp.FileSystemWriter(folder, thread_count=1),
                 planner=_Lazy(dedup_save_to_lowest_rank=False), no_dist=True)
