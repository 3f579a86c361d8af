"""Streaming merges, file to file, with memory bounded by the largest tensor whatever the model's size.

Everything is checked first on ``meta`` tensors (keys, shapes, dtypes, alphas, free disk space).
Merging changes no shape, so each output shard's safetensors header is written before any tensor is
computed. Every tensor is then read and merged in row blocks straight into page-aligned chunks of the
output, which a background thread writes with direct I/O where the file system allows it.
safetensors has no streaming writer, so the header is written here by the format's specification
(an 8-byte little-endian length, a JSON header padded to 8 bytes, the tensors' bytes in order); the
output is read back with safetensors itself in the tests. Files are written under temporary names and
renamed into place at the end; a failure leaves no output and the inputs untouched.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lora_ckpt._version import __version__
from lora_ckpt.convert import LoadReport
from lora_ckpt.errors import CheckpointFileError, LayoutError
from lora_ckpt.formats.hf import copy_model_extras, install_folder, weight_files
from lora_ckpt.formats.peft import is_peft_dir, load_peft_adapter
from lora_ckpt.io import _FORMAT_VERSION, _META_KEY, Checkpoint, PathLike, as_checkpoint, load_checkpoint
from lora_ckpt.layout import Layout, _tied_groups, detect_layout, split_prefix
from lora_ckpt.merge import Alpha, Factors, MergePlan, Step, _merge_blocked, module_factors, plan_merge

__all__ = ["LazySource", "StreamReport", "parse_size", "stream_merge"]

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# Rows read and merged at a time: about 32 MiB of the source.
_IO_BLOCK_BYTES = 32 << 20
# Output files are gathered in page-aligned chunks of this size and written by a background thread with
# direct I/O where the file system allows it: the bytes go from the chunk to the disk, not through the
# page cache (a buffered write is one more copy on the CPU, and flushing the page cache was slower).
_CHUNK_BYTES = 2 * _IO_BLOCK_BYTES
_ALIGN = 4096  # direct I/O needs addresses, offsets and lengths aligned to the device's block size
_DIRECT_IO = hasattr(os, "O_DIRECT")  # where the platform has it; a file system that refuses it falls back


def parse_size(size: int | str) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an int (decimal units as Hugging Face reads them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", size, flags=re.I)
    if not m:
        raise ValueError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or 2GiB")
    unit = m.group(2).upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * (1024 if unit.endswith("I") else 1000) ** power)


class LazySource:
    """The tensors of a weights file or Hugging Face folder, read on demand.

    Shapes and dtypes come from the safetensors headers; tensors are read by row ranges, each through
    its own short-lived ``safe_open`` so nothing stays mapped. Torch pickles are memory-mapped
    (``torch.load(mmap=True, weights_only=True)``).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.files = weight_files(path)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.loaded: dict[str, torch.Tensor] = {}
        self.checkpoint: Checkpoint | None = None
        self.metadata: dict[str, Any] = {}
        self.offsets: dict[str, int] = {}  # key -> absolute file offset of its data (safetensors)
        self._fds: dict[Path, int] = {}
        for f in self.files:
            if f.suffix == ".safetensors":
                self._read_header(f)
            else:
                ckpt = load_checkpoint(f)
                self.checkpoint = ckpt
                for k, t in ckpt.state_dict.items():
                    self.loaded[k], self.shapes[k], self.dtypes[k] = t, tuple(t.shape), t.dtype

    def _read_header(self, f: Path) -> None:
        self.offsets.update(_data_offsets(f))
        try:
            with safe_open(f, framework="pt") as st:
                meta = st.metadata() or {}
                for k in st.keys():  # noqa: SIM118
                    sl = st.get_slice(k)
                    self.where[k], self.shapes[k] = f, tuple(sl.get_shape())
                    self.dtypes[k] = _ST_DTYPES[sl.get_dtype()]
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointFileError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        if _META_KEY in meta:
            self.metadata = json.loads(meta[_META_KEY])
            for alias, key in self.metadata.get("aliases", {}).items():
                self.where[alias], self.shapes[alias], self.dtypes[alias] = f, self.shapes[key], self.dtypes[key]
                self.metadata.setdefault("_alias_of", {})[alias] = key

    def aliases(self) -> dict[str, str]:
        """Keys that hold the same tensor as another key (tied weights): alias -> the key stored."""
        if self.checkpoint is not None:
            return {alias: group[0] for group in _tied_groups(self.loaded) for alias in group[1:]}
        return dict(self.metadata.get("_alias_of", {}))

    def keys(self) -> list[str]:
        order = self.metadata.get("order")
        return list(order) if order and set(order) == set(self.shapes) else list(self.shapes)

    def meta(self) -> dict[str, torch.Tensor]:
        """``meta`` tensors of every shape and dtype, for planning."""
        return {k: torch.empty(self.shapes[k], dtype=self.dtypes[k], device="meta") for k in self.keys()}

    def read_into(self, key: str, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of ``key`` read into the uint8 buffer ``buf``; returns the typed view.

        Plain positioned reads, no memory map: resident memory does not grow with the file.
        """
        shape, dtype = self.shapes[key], self.dtypes[key]
        row = math.prod(shape[1:]) * dtype.itemsize
        n = (stop - start) * row
        real = self.metadata.get("_alias_of", {}).get(key, key)
        view = buf[:n]
        if real not in self.offsets:  # a memory-mapped torch pickle
            view.copy_(self.read(key, start, stop).contiguous().reshape(-1).view(torch.uint8))
        else:
            path = self.where[key]
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            mv, offset, done = view.numpy().data, self.offsets[real] + start * row, 0
            while done < n:
                got = os.preadv(fd, [mv[done:]], offset + done)
                if got <= 0:
                    raise CheckpointFileError(f"{path}: truncated while reading {key}")
                done += got
        return view.view(dtype).view((stop - start, *shape[1:]))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``key``, or its rows ``start:stop`` (first dimension)."""
        if key in self.loaded:
            t = self.loaded[key]
            return t if start is None else t[start:stop]
        real = self.metadata.get("_alias_of", {}).get(key, key)
        with safe_open(self.where[key], framework="pt") as st:
            if start is None:
                return st.get_tensor(real)
            return st.get_slice(real)[start:stop]


def _data_offsets(path: Path) -> dict[str, int]:
    """Each tensor's absolute data offset in a safetensors file (the header as the format defines it)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFileError(f"{path}: corrupt safetensors header ({e})") from None
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


class _Pool:
    """A few reusable byte buffers (fresh allocations would page-fault on every block).

    ``aligned`` buffers start on a page boundary, as direct I/O needs; ``pinned`` ones are page-locked,
    so host<->device copies run asynchronously.
    """

    def __init__(self, count: int, nbytes: int, *, pinned: bool = False, aligned: bool = False) -> None:
        self.nbytes, self.pinned = nbytes, pinned
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            raw = torch.empty(nbytes + (_ALIGN if aligned else 0), dtype=torch.uint8, pin_memory=pinned)
            skip = -raw.data_ptr() % _ALIGN if aligned else 0
            self.free.put(raw[skip : skip + nbytes])

    def get(self, nbytes: int | None = None) -> torch.Tensor:
        if nbytes is not None and nbytes > self.nbytes:  # one row larger than a block: a one-off buffer
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self.free.get()

    def put(self, buf: torch.Tensor) -> None:
        if buf.numel() == self.nbytes:
            self.free.put(buf)


@dataclass
class StreamReport:
    """What :func:`stream_merge` or :func:`~lora_ckpt.stream_convert` wrote: the files, tensor and byte
    counts, the merged keys, seconds taken, and for a conversion to a template's layout its key-by-key report."""

    files: list[Path]
    tensors: int
    bytes: int
    merged: list[str] = field(default_factory=list)
    seconds: float = 0.0
    conversion: LoadReport | None = None


def _file_info(source: LazySource) -> Checkpoint:
    """What a file records beside its tensors: the alpha and the other entries (``model_args`` …), no tensors."""
    recorded = source.checkpoint.alpha if source.checkpoint else source.metadata.get("alpha")
    if source.checkpoint is not None:
        extra = dict(source.checkpoint.extra)
    else:
        extra = {"model_args": source.metadata["model_args"]} if source.metadata.get("model_args") else {}
    return Checkpoint({}, alpha=recorded, alpha_source="the file", extra=extra, path=source.path)


def _read_factors(source: LazySource, layout: Layout) -> dict[str, torch.Tensor]:
    """The LoRA factors (and magnitudes, alphas) of a file that also holds its base: small, read now; keys as in the file."""
    return {layout.prefix + k: source.read(layout.prefix + k) for m in layout.modules for k in m.factor_keys}


def _plan(
    source: LazySource, adapter: object, alpha: Alpha | None, dtype: torch.dtype | None, tied: str
) -> tuple[MergePlan, dict[str, Any]]:
    meta = source.meta()
    extra: dict[str, Any] = {}
    if adapter is None:  # a LoRA file that holds its base: factors are small, read them now
        small = _read_factors(source, detect_layout(meta))
        ckpt = _file_info(source)
        plan = plan_merge({**meta, **small}, alpha=ckpt.resolve_alpha(alpha), dtype=dtype, tied=tied)  # type: ignore[arg-type]
        return plan, ckpt.extra
    if isinstance(adapter, (str, os.PathLike)) and is_peft_dir(adapter):
        peft = load_peft_adapter(adapter)
        if alpha is not None:
            raise LayoutError(f"{adapter}: the alpha comes from adapter_config.json; do not pass alpha")
        plan = plan_merge(peft.state_dict, base=meta, scales=peft.scales, layout=peft.layout, dtype=dtype,
                          fan_in_fan_out=peft.fan_in_fan_out)
        return plan, extra
    ck = as_checkpoint(adapter)  # type: ignore[arg-type]
    return plan_merge(ck.state_dict, base=meta, alpha=ck.resolve_alpha(alpha), dtype=dtype), extra


def _shards(sizes: list[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes:
        if max_bytes is not None and shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in entries:
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _open_out(path: Path) -> int:
    """A new file for writing, with direct I/O where the file system allows it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if _DIRECT_IO:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system does not do direct I/O
                raise
    return os.open(path, flags, 0o644)


def _write(fd: int, offset: int, data: torch.Tensor) -> int:
    """Write the bytes of the CPU uint8 tensor ``data`` at ``offset`` of the file ``fd``; returns the byte count."""
    mv, done = data.numpy().data, 0
    while done < len(mv):
        try:
            done += os.pwrite(fd, mv[done:], offset + done)
        except OSError as e:
            if e.errno != errno.EINVAL or not _drop_direct_io(fd):
                raise
    if hasattr(os, "posix_fadvise") and done >= 1 << 20 and not _is_direct(fd):
        # a buffered write: start writing it back now (and drop it from the page cache), so the final
        # fsync has little left to wait for and a big merge does not crowd the page cache
        os.posix_fadvise(fd, offset, done, os.POSIX_FADV_DONTNEED)
    return done


def _is_direct(fd: int) -> bool:
    import fcntl  # POSIX only, as direct I/O is

    return _DIRECT_IO and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _drop_direct_io(fd: int) -> bool:
    """Turn direct I/O off for ``fd`` after the file system refused a direct write; False if it was off."""
    import fcntl

    if not _is_direct(fd):
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    log.debug("direct I/O refused for fd %d; writing through the page cache", fd)
    return True


def _blocks(rows: int, row_bytes: int, block_bytes: int = _IO_BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    step = max(1, block_bytes // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


class _Out:
    """One output file written front to back: its bytes gather in aligned chunks, which the sink writes.

    Producers fill the view :meth:`reserve` returns in place (merged rows are computed straight into
    it) or hand finished bytes to :meth:`write`. Only whole aligned stretches are written until
    :meth:`finish`, which pads the last one, truncates the file to its size and syncs it.
    """

    def __init__(self, path: Path, sink: _Sink, chunks: _Pool) -> None:
        self.fd = _open_out(path)
        self.sink, self.chunks = sink, chunks
        self.buf: torch.Tensor | None = chunks.get()
        self.fill = 0  # bytes gathered in buf
        self.offset = 0  # the file offset of buf[0]
        self.ready: Any = None  # on a GPU: the copy-out event the bytes in buf wait for

    def reserve(self, n: int) -> torch.Tensor | None:
        """The next ``n`` bytes of the file, to fill before the next call; None if they cannot fit a chunk."""
        assert self.buf is not None
        if self.fill + n > self.buf.numel():
            if n > self.buf.numel() - _ALIGN:
                return None
            self._flush()
        view = self.buf[self.fill : self.fill + n]
        self.fill += n
        return view

    def write(self, data: torch.Tensor) -> None:
        """Append the bytes of the CPU uint8 tensor ``data``."""
        done = 0
        while done < data.numel():
            assert self.buf is not None
            if self.fill == self.buf.numel():
                self._flush()
            k = min(self.buf.numel() - self.fill, data.numel() - done)
            self.buf[self.fill : self.fill + k].copy_(data[done : done + k])
            self.fill, done = self.fill + k, done + k

    def _flush(self, *, last: bool = False) -> None:
        """Hand the aligned part of the chunk to the sink; the unaligned rest starts the next chunk."""
        assert self.buf is not None
        size = self.fill
        keep = size if last else size - size % _ALIGN
        length = size + -size % _ALIGN if last else keep
        self.buf[size:length].zero_()  # padding past the end, cut off by finish()
        following = None if last else self.chunks.get()
        if size > keep:
            assert following is not None
            if self.ready is not None:
                self.ready.synchronize()
            following[: size - keep].copy_(self.buf[keep:size])
        self.sink.put(self.fd, self.offset, self.buf[:length], self.buf, self.ready)
        self.offset, self.buf, self.fill, self.ready = self.offset + keep, following, size - keep, None

    def finish(self) -> int:
        """Write what is left, wait for every write, cut the padding and sync; returns the file's size."""
        size = self.offset + self.fill
        self._flush(last=True)
        self.sink.drain()
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)
        return size

    def close(self) -> None:
        self.sink.drain_quietly()  # after a failure too, so no thread writes to a closed file
        os.close(self.fd)
        if self.buf is not None:
            self.chunks.put(self.buf)
            self.buf = None


class _Writer:
    """Produces each planned tensor, block by block, into an output file."""

    def __init__(self, plan: MergePlan, source: LazySource, prefix: str, device: torch.device | None) -> None:
        self.plan, self.source, self.prefix, self.device = plan, source, prefix, device
        cuda = device is not None and device.type == "cuda"
        # pinned: host<->device copies run asynchronously
        self.pool = _Pool(2, _IO_BLOCK_BYTES, pinned=cuda)  # source rows of the block being merged
        self.chunks = _Pool(3, _CHUNK_BYTES, pinned=cuda, aligned=True)  # one filling, two being written
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.compute_stream = torch.cuda.Stream(device) if cuda else None

    def emit(self, step: Step, meta_out: torch.Tensor, out: _Out) -> int:
        """Append the output tensor of ``step`` to ``out``; returns its byte count.

        Rows are read, merged (or cast) and written in blocks; a merge computes straight into the
        output chunk, and a plain copy reads straight into it.
        """
        if meta_out.dim() == 0 or step.op == "bias" or (step.module is not None and step.module.is_dora):
            whole = self._whole(step).detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            out.write(whole)
            return whole.numel()
        rows, shape = meta_out.shape[0], tuple(meta_out.shape)
        src_meta = self.plan.source(step, self.plan.big)
        in_size = src_meta.dtype.itemsize if src_meta is not None else 0
        row_elems = math.prod(shape[1:])
        row_bytes = row_elems * max(in_size, meta_out.dtype.itemsize)
        fac = None
        if step.op == "merge":
            assert step.module is not None
            fac = module_factors(step.module, self.plan.adapter, src_meta, dtype=self.plan.dtype,
                                 fan_in_fan_out=self.plan.fan_in_fan_out, device=self.device or "cpu")
            if self.compute_stream is not None:  # the factors were made on the default stream
                self.compute_stream.wait_stream(torch.cuda.current_stream(self.device))
        same = fac is None and src_meta is not None and src_meta.dtype == meta_out.dtype and not step.from_adapter
        written = 0
        for a, b in _blocks(rows, row_bytes, self.pool.nbytes):
            n = (b - a) * row_elems * meta_out.dtype.itemsize
            dst = out.reserve(n)
            spill = dst is None  # a row too long for a chunk: compute aside, then copy in
            dst = torch.empty(n, dtype=torch.uint8, pin_memory=self.pool.pinned) if dst is None else dst
            if same:  # a plain copy: read the bytes straight into the file's chunk
                assert step.source is not None
                self.source.read_into(self.prefix + step.source, a, b, dst)
            else:
                ready = self._fill(step, fac, a, b, row_elems * in_size, dst.view(meta_out.dtype).view((b - a, *shape[1:])))
                if ready is not None and spill:
                    ready.synchronize()
                elif ready is not None:
                    out.ready = ready
            if spill:
                out.write(dst)
            written += n
        return written

    def _fill(self, step: Step, fac: Factors | None, a: int, b: int, nbytes: int, out: torch.Tensor) -> Any:
        """Rows ``a:b`` of the step's output into ``out``; on a GPU, returns the event after which they are there."""
        src = self._rows(step, a, b, nbytes)
        ready = None
        if fac is None:  # a copy, cast where asked
            assert src is not None
            out.copy_(src[0])
        else:
            base = None if src is None else src[0]
            if base is not None:
                base = base.flatten(1) if base.dim() == 4 else base
            flat = out.flatten(1) if out.dim() == 4 else out
            if self.copy_stream is None:
                _merge_blocked(base, fac.left[a:b], fac.right, step.scale, fac.acc, fac.out_dtype, out=flat)
            else:
                ready = self._merge_on_gpu(base, fac, a, b, step.scale, flat)
        if src is not None and src[1] is not None:
            self.pool.put(src[1])
        return ready

    def _merge_on_gpu(
        self, base: torch.Tensor | None, fac: Factors, a: int, b: int, scale: float, out: torch.Tensor
    ) -> Any:
        """Copy in on the copy stream, merge on the compute stream, copy out; return the copy-out's event.

        The next block's read from disk and copy-in overlap this block's merge. The input buffer is
        free once the copy-in is done (waited for here, before the caller returns it to the pool).
        """
        assert self.copy_stream is not None and self.compute_stream is not None
        copied_in = torch.cuda.Event()
        with torch.cuda.stream(self.copy_stream):
            base_gpu = None if base is None else base.to(fac.left.device, non_blocking=True)
            copied_in.record(self.copy_stream)
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(copied_in)
            merged = _merge_blocked(base_gpu, fac.left[a:b], fac.right, scale, fac.acc, fac.out_dtype)
            _used_on(base_gpu, self.compute_stream)
            computed = torch.cuda.Event()
            computed.record(self.compute_stream)
        copied_out = torch.cuda.Event()
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(computed)
            out.copy_(merged, non_blocking=True)
            _used_on(merged, self.copy_stream)
            copied_out.record(self.copy_stream)
        copied_in.synchronize()
        return copied_out

    def _rows(self, step: Step, a: int, b: int, nbytes: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Source rows ``a:b`` and the pool buffer holding them (None when they live in the adapter)."""
        if step.source is None:
            return None
        if step.from_adapter:
            return self.plan.adapter[step.source][a:b], None
        buf = self.pool.get(nbytes)
        return self.source.read_into(self.prefix + step.source, a, b, buf), buf

    def _whole(self, step: Step) -> torch.Tensor:
        src = None
        if step.source is not None:
            src = self.plan.adapter[step.source] if step.from_adapter else self.source.read(self.prefix + step.source)
        return self.plan.compute(step, {step.source: src} if step.source is not None else {})  # type: ignore[dict-item]


def _used_on(t: torch.Tensor | None, stream: Any) -> None:
    """Tell the CUDA caching allocator that ``stream`` uses ``t``, so its memory is not reused too early."""
    if t is not None and t.is_cuda:
        t.record_stream(stream)


class _Sink:
    """Writes chunks at their offsets on a background thread, so reading and merging overlap the writes."""

    def __init__(self, pool: _Pool, depth: int = 4) -> None:
        self.pool = pool
        self.queue: queue.Queue[tuple[int, int, torch.Tensor, torch.Tensor, Any] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="lora-ckpt-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                fd, offset, data, buf, ready = item
                try:
                    if ready is not None:  # GPU blocks: wait until their bytes are on the host
                        ready.synchronize()
                    if self.error is None:
                        _write(fd, offset, data)
                finally:
                    self.pool.put(buf)
            except BaseException as e:  # handed to the main thread by _check
                self.error = e
            finally:
                self.queue.task_done()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, fd: int, offset: int, data: torch.Tensor, buf: torch.Tensor, ready: Any) -> None:
        self._check()
        self.queue.put((fd, offset, data, buf, ready))

    def drain(self) -> None:
        self.queue.join()
        self._check()

    def drain_quietly(self) -> None:
        self.queue.join()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()


def stream_merge(
    source: PathLike,
    out: PathLike,
    *,
    adapter: PathLike | Mapping[str, torch.Tensor] | Checkpoint | None = None,
    alpha: Alpha | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> StreamReport:
    """Merge file to file with bounded memory; return what was written.

    ``source`` is a LoRA checkpoint holding its base (``adapter=None``) or, with ``adapter`` (a PEFT
    folder, kohya or any LoRA file), the base: a ``.safetensors``/``.pt`` file or a Hugging Face folder
    (sharded too). ``out`` is a ``.safetensors`` file, or a folder (``model.safetensors``, or shards
    ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json`` with ``max_shard_size``;
    other files of a source folder, such as ``config.json``, are copied). The result is bit-identical
    to :func:`~lora_ckpt.merge_lora` in memory. With ``device="cuda"`` the blocks are merged on the GPU.
    While it runs, torch uses one intra-op thread (restored afterwards), leaving the other cores to the writers.

    Raises:
        CheckpointFileError: unreadable inputs, an existing output without ``overwrite``, too little disk.
        LayoutError, ShapeError, AlphaError, KeyMismatchError: found before any tensor is computed.
    """
    started = time.perf_counter()
    target, max_bytes = _output(out, max_shard_size, overwrite)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointFileError("device cuda was asked for, but torch sees no CUDA device")

    src = LazySource(source)
    plan, extra = _plan(src, adapter, alpha, dtype, "untie")
    metadata = {"format_version": _FORMAT_VERSION, "layout": "standard", "order": [s.key for s in plan.steps],
                "aliases": {s.key: s.source for s in plan.steps if s.op == "alias"}}
    if extra.get("model_args"):
        metadata["model_args"] = {k: v for k, v in dict(extra["model_args"]).items() if not str(k).startswith("lora_")}
    prefix = split_prefix(src.keys()[0])[0]  # planning checked that every key carries the same one
    report = _write_plan(plan, src, prefix, target, metadata, max_bytes, dev, progress, source)
    report.merged = [s.key for s in plan.steps if s.op == "merge"]
    report.seconds = time.perf_counter() - started
    return report


def _output(out: PathLike, max_shard_size: int | str | None, overwrite: bool) -> tuple[Path, int | None]:
    """The output path and shard size in bytes, checked: not there (or ``overwrite``), a folder if sharded."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise CheckpointFileError(f"{target}: already exists; pass overwrite=True (CLI: --force) to replace it")
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    if target.suffix == ".safetensors" and max_bytes is not None:
        raise CheckpointFileError(f"{target}: a sharded output is a folder; give a folder name, not a .safetensors file")
    if not target.parent.is_dir():
        raise CheckpointFileError(f"{target}: the folder {target.parent} does not exist")
    return target, max_bytes


def _write_plan(
    plan: MergePlan,
    src: LazySource,
    prefix: str,
    target: Path,
    metadata: dict[str, Any],
    max_bytes: int | None,
    dev: torch.device | None,
    progress: bool,
    source: PathLike,
) -> StreamReport:
    """Write the plan's output to ``target`` (a ``.safetensors`` file or a folder, sharded by ``max_bytes``).

    ``prefix`` goes before the plan's source keys in ``src``; ``metadata`` is lora_ckpt's; the other
    files of a ``source`` folder are copied into an output folder.
    """
    as_file = target.suffix == ".safetensors"
    if max_bytes is not None and any(s.op == "alias" for s in plan.steps):
        # shards are read one at a time (an alias in one could not reach its tensor in another): store in full
        by_key = {s.key: s for s in plan.steps}
        steps = [replace(by_key[s.source], key=s.key) if s.op == "alias" and s.source else s for s in plan.steps]
        plan = replace(plan, steps=steps)
        metadata = {**metadata, "aliases": {}}
    meta_out = {s.key: _meta_result(plan, s) for s in plan.steps if s.op != "alias"}
    order = [s.key for s in plan.steps if s.op != "alias"]
    total = sum(meta_out[k].numel() * meta_out[k].dtype.itemsize for k in order)
    free = shutil.disk_usage(target.parent).free
    if total + (64 << 20) > free:
        raise CheckpointFileError(f"{target.parent}: {free / 1e9:.2f} GB free, the output needs {total / 1e9:.2f} GB")

    shards = _shards([(k, meta_out[k].numel() * meta_out[k].dtype.itemsize) for k in order], max_bytes)
    n = len(shards)
    names = [target.name] if as_file else (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    by_key = {s.key: s for s in plan.steps}
    writer = _Writer(plan, src, prefix, dev)
    bar = _progress(total) if progress else None
    workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    written = 0
    sink = _Sink(writer.chunks)
    # One torch thread: with more, OpenMP workers spinning between the small block operations took the
    # cores from the reads and writes (a 4 GB merge ran in 3.5 s with 2 threads, 1.8 s with 1, on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, keys in zip(names, shards):
            file = _Out(workdir / name, sink, writer.chunks)
            try:
                entries = [(k, meta_out[k].dtype, tuple(meta_out[k].shape)) for k in keys]
                st_meta = {"format": "pt", _META_KEY: json.dumps({**metadata, "lora_ckpt_version": __version__})}
                file.write(torch.frombuffer(bytearray(_header(entries, st_meta)), dtype=torch.uint8))
                for k in keys:
                    n_bytes = writer.emit(by_key[k], meta_out[k], file)
                    expected = meta_out[k].numel() * meta_out[k].dtype.itemsize
                    if n_bytes != expected:  # a broken plan must never produce a file with wrong offsets
                        raise CheckpointFileError(f"{k}: wrote {n_bytes} bytes, expected {expected}")
                    written += n_bytes
                    if bar is not None:
                        bar.update(n_bytes)
                        bar.set_postfix(tensors=f"{order.index(k) + 1}/{len(order)}", refresh=False)
                file.finish()
            finally:
                file.close()
        sink.close()
        src.close()
        files = _install(workdir, target, names, shards, meta_out, as_file, source)
    except BaseException:
        sink.close()
        src.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    return StreamReport(files, len(order), written)


def _meta_result(plan: MergePlan, step: Step) -> torch.Tensor:
    """The shape and dtype of a step's output (a merge keeps the base's shape)."""
    src = plan.source(step, plan.big)
    if src is None:  # a lora-only embedding
        assert step.module is not None
        shape: tuple[int, ...] = step.module.delta_shape
    else:
        shape = tuple(src.shape)
    return torch.empty(shape, dtype=plan.out_dtype(step), device="meta")


def _install(
    workdir: Path,
    target: Path,
    names: list[str],
    shards: list[list[str]],
    meta_out: Mapping[str, torch.Tensor],
    as_file: bool,
    source: PathLike,
) -> list[Path]:
    """Move the finished files into place: a file by rename, a folder (index, copied extras) as a whole."""
    if as_file:
        os.replace(workdir / names[0], target)
        workdir.rmdir()
        return [target]
    if len(names) > 1:
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        size = sum(t.numel() * t.dtype.itemsize for t in meta_out.values())
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (workdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if Path(source).is_dir():
        copy_model_extras(source, workdir)
    install_folder(workdir, target)
    return [target / n for n in names]


def _progress(total: int) -> Any:
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:  # the progress extra is not installed
        log.info("install lora-ckpt[progress] (tqdm) for a progress bar")
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", dynamic_ncols=True)
