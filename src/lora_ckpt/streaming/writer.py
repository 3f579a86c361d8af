"""The sharded safetensors writer: owns how streamed bytes reach the disk, and nothing about LoRA.

safetensors has no streaming writer, so each shard's header is written here by the format's
specification (an 8-byte little-endian length, a JSON header padded to 8 bytes, the tensors' bytes in
order) before any tensor is produced. The bytes gather in page-aligned chunks, which one background
thread writes with direct I/O where the file system allows it (buffered writes otherwise, or after a
refusal). Where the files go, and how they are installed, is the :class:`~lora_ckpt.output.Output`'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_ckpt._table import Compact
from lora_ckpt.errors import CheckpointFileError
from lora_ckpt.filemeta import FileMeta
from lora_ckpt.formats.hf import copy_model_extras
from lora_ckpt.io import check_safetensors_keys
from lora_ckpt.output import Output
from lora_ckpt.source import SAFETENSORS_DTYPES
from lora_ckpt.streaming.parallel import Ranks

__all__ = [
    "BufferPool", "OutFile", "ShardedWriter", "StreamOptions", "StreamReport", "human_size", "parse_size", "plan_shards",
    "row_blocks",
]

log = logging.getLogger(__name__)

_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_ALIGN = 4096  # direct I/O needs addresses, offsets and lengths aligned to the device's block size


def human_size(n: int) -> str:
    """``n`` bytes in the largest decimal unit that keeps it at least 1 (``"1.23 GB"``, ``"96 kB"``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def parse_size(size: int | str) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an int (decimal units as Hugging Face reads them)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"a size must be positive, not {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.I)
    if not m:
        raise ValueError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or 2GiB")
    unit = m.group(2).upper().rstrip("B")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    value = int(float(m.group(1)) * (1024 if unit.endswith("I") else 1000) ** power)
    if value <= 0:
        raise ValueError(f"a size must be positive, not {size!r}")
    return value


@dataclass(frozen=True)
class StreamOptions:
    """How streamed bytes are read and written; the defaults are what the benchmarks chose.

    ``block_bytes``: source rows read and merged at a time (about 32 MiB). ``chunk_bytes``: output is
    gathered in page-aligned chunks of this size. ``direct_io``: write with ``O_DIRECT`` where the file
    system allows it. ``pwrite``: the positioned write (a seam for tests that inject faults).
    ``streams``: a (copy, compute) pair of CUDA streams to use instead of new ones.
    """

    block_bytes: int = 32 << 20
    chunk_bytes: int = 64 << 20
    direct_io: bool = hasattr(os, "O_DIRECT")
    pwrite: Callable[[int, Any, int], int] = os.pwrite
    streams: tuple[Any, Any] | None = None


@dataclass(repr=False)
class StreamReport(Compact):
    """What a streamed merge or conversion wrote: the files, tensor and byte counts, the merged keys,
    seconds taken, for a conversion to a template's layout its key-by-key report, what was left out, and the
    merged modules whose update is zero (``inert``: every ``lora_B`` 0 or a scale of 0)."""

    files: list[Path]
    tensors: int
    bytes: int
    merged: list[str] = field(default_factory=list)
    seconds: float = 0.0
    conversion: Any = None
    left_out: list[str] = field(default_factory=list)
    inert: list[str] = field(default_factory=list)


class BufferPool:
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
        """A free buffer (waits for one); a one-off buffer when ``nbytes`` exceeds the pool's size."""
        if nbytes is not None and nbytes > self.nbytes:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self.free.get()

    def put(self, buf: torch.Tensor) -> None:
        """Return a buffer taken with :meth:`get`."""
        if buf.numel() == self.nbytes:
            self.free.put(buf)


class _Sink:
    """Writes chunks at their offsets on a background thread, so reading and merging overlap the writes."""

    def __init__(self, pool: BufferPool, options: StreamOptions, depth: int = 4) -> None:
        self.pool, self.options = pool, options
        self.queue: queue.Queue[tuple[int, Path, int, torch.Tensor, torch.Tensor, Any] | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="lora-ckpt-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                fd, path, offset, data, buf, ready = item
                try:
                    if ready is not None:  # GPU blocks: wait until their bytes are on the host
                        ready.synchronize()
                    if self.error is None:
                        self._write(fd, path, offset, data)
                finally:
                    self.pool.put(buf)
            except BaseException as e:  # handed to the main thread by check()
                self.error = e
            finally:
                self.queue.task_done()

    def _write(self, fd: int, path: Path, offset: int, data: torch.Tensor) -> None:
        mv, done = data.numpy().data, 0
        while done < len(mv):
            try:
                done += self.options.pwrite(fd, mv[done:], offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL and _drop_direct_io(fd):
                    continue
                raise OSError(e.errno, e.strerror, str(path)) from None
        if hasattr(os, "posix_fadvise") and done >= 1 << 20 and not _is_direct(fd):
            # a buffered write: start writing it back now (and drop it from the page cache), so the final
            # fsync has little left to wait for and a big merge does not crowd the page cache
            os.posix_fadvise(fd, offset, done, os.POSIX_FADV_DONTNEED)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, fd: int, path: Path, offset: int, data: torch.Tensor, buf: torch.Tensor, ready: Any) -> None:
        self.check()
        self.queue.put((fd, path, offset, data, buf, ready))

    def drain(self) -> None:
        self.queue.join()
        self.check()

    def drain_quietly(self) -> None:
        self.queue.join()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()


def _is_direct(fd: int) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    import fcntl  # POSIX only, as direct I/O is

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _drop_direct_io(fd: int) -> bool:
    """Turn direct I/O off for ``fd`` after the file system refused a direct write; False if it was off."""
    import fcntl

    if not _is_direct(fd):
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    log.debug("direct I/O refused for fd %d; writing through the page cache", fd)
    return True


def _open_out(path: Path, direct: bool) -> int:
    """The (staged, already created) file for writing, with direct I/O where asked and allowed."""
    flags = os.O_WRONLY | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system does not do direct I/O
                raise
    return os.open(path, flags)


class OutFile:
    """One output file written front to back: its bytes gather in aligned chunks, which the sink writes.

    Producers fill the view :meth:`reserve` returns in place (merged rows are computed straight into
    it) or hand finished bytes to :meth:`write`. Only whole aligned stretches are written until
    :meth:`finish`, which pads the last one, truncates the file to its size and syncs it.
    """

    def __init__(self, path: Path, sink: _Sink, chunks: BufferPool, direct: bool) -> None:
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
        self.path = path
        self.fd = _open_out(path, direct)
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
        self.sink.put(self.fd, self.path, self.offset, self.buf[:length], self.buf, self.ready)
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


#: What a producer is given per tensor: the key, and the file to append its bytes to; it returns the byte count.
Produce = Callable[[str, OutFile], int]


class ShardedWriter:
    """Writes tensors produced one at a time into a ``.safetensors`` file or a (sharded) model folder.

    Settings live here; :meth:`write` takes the tensors' keys, dtypes and shapes (known before any is
    computed), lora_ckpt's metadata, and a producer that appends each tensor's bytes.
    """

    def __init__(
        self,
        output: Output,
        *,
        max_shard_size: int | str | None = None,
        options: StreamOptions | None = None,
        pinned: bool = False,
        extras_from: Path | None = None,
        extras_dtype: torch.dtype | None = None,
        ranks: Ranks | None = None,
    ) -> None:
        self.output, self.options, self.ranks = output, options or StreamOptions(), ranks
        self.max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
        if not output.folder and self.max_bytes is not None:
            raise CheckpointFileError(
                f"{output.path}: a sharded output is a folder; give a folder name, not a .safetensors file"
            )
        self.pinned, self.extras_from, self.extras_dtype = pinned, extras_from, extras_dtype
        self.chunks = BufferPool(3, self.options.chunk_bytes, pinned=pinned, aligned=True)  # one filling, two written

    @property
    def sharded(self) -> bool:
        return self.max_bytes is not None

    def write(
        self,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        meta: FileMeta,
        produce: Produce,
        *,
        on_bytes: Callable[[str, int], None] | None = None,
        into: Path | None = None,
    ) -> StreamReport:
        """Write every entry (in order) through ``produce``; install the output once all are complete.

        ``into``: a staging path the caller got from :func:`~lora_ckpt.output.write_together` (for outputs
        installed in pairs); the caller installs it.
        """
        check_safetensors_keys([k for k, _, _ in entries], self.output.path)
        sizes = [(k, math.prod(shape) * dtype.itemsize) for k, dtype, shape in entries]
        total = sum(n for _, n in sizes)
        free = shutil.disk_usage(self.output.path.parent).free
        if total + (64 << 20) > free:
            raise CheckpointFileError(
                f"{self.output.path.parent}: {human_size(free)} free, the output needs {human_size(total)} "
                "(and 64 MB to spare); free some space or write elsewhere"
            )
        shards = plan_shards(sizes, self.max_bytes)
        n = len(shards)
        names = [None] if not self.output.folder else (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        by_key = {k: (dtype, shape) for k, dtype, shape in entries}
        counts = {"written": 0}
        left_out: list[str] = []
        sink = _Sink(self.chunks, self.options)

        mine = set(range(n)) if self.ranks is None else set(self.ranks.mine([sum(_size_of(by_key[k]) for k in ks)
                                                                              for ks in shards]))

        def fill(staged: Path) -> None:
            for i, (name, keys) in enumerate(zip(names, shards)):
                if i not in mine:
                    continue
                path = staged if name is None else staged / name
                file = OutFile(path, sink, self.chunks, self.options.direct_io)
                try:
                    header = _header([(k, *by_key[k]) for k in keys], meta.to_header())
                    file.write(torch.frombuffer(bytearray(header), dtype=torch.uint8))
                    for k in keys:
                        got, expected = produce(k, file), _size_of(by_key[k])
                        if got != expected:  # a broken producer must never leave a file with wrong offsets
                            raise CheckpointFileError(f"{k}: wrote {got} bytes, expected {expected}")
                        counts["written"] += got
                        if on_bytes is not None:
                            on_bytes(k, got)
                    file.finish()
                finally:
                    file.close()

        def finish(staged: Path) -> None:
            if self.output.folder:
                if n > 1:
                    weight_map = {k: name for name, keys in zip(names, shards, strict=True) for k in keys}
                    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                    (staged / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
                if self.extras_from is not None and self.extras_from.is_dir():
                    left_out.extend(copy_model_extras(self.extras_from, staged, dtype=self.extras_dtype))

        try:
            if self.ranks is not None:
                self._write_ranks(fill, finish, into)
            elif into is not None:
                fill(into)
                finish(into)
            else:
                with self.output.writing() as staged:
                    fill(staged)
                    finish(staged)
        finally:
            sink.close()
        written = total if self.ranks is not None else counts["written"]  # every rank reported success
        files = [self.output.path] if not self.output.folder else [self.output.path / str(nm) for nm in names]
        return StreamReport(files, len(entries), written, left_out=left_out)


    def _write_ranks(self, fill: Callable[[Path], None], finish: Callable[[Path], None], into: Path | None) -> None:
        """Rank 0 stages the output and shares the path; each rank fills its shards; once all succeeded rank 0
        finishes (index, extras) and installs; every rank returns after the install (or raises if any failed)."""
        ranks = self.ranks
        assert ranks is not None
        ranks.agree(None)  # every rank has checked its output (and cleaned leftovers) before rank 0 stages
        with contextlib.ExitStack() as stack:
            error: BaseException | None = None
            staged = into
            if ranks.rank == 0 and into is None:
                try:
                    staged = stack.enter_context(self.output.writing())
                except Exception as e:  # noqa: BLE001 - told to every rank by agree()
                    error = e
            ranks.agree(error)
            staged = ranks.share(staged)
            try:
                fill(staged)
            except Exception as e:  # noqa: BLE001
                error = e
            ranks.agree(error)
            if ranks.rank == 0:
                finish(staged)
        ranks.agree(None)  # rank 0 installed (an install failure raised there; the others wait for it here)


def _size_of(dtype_shape: tuple[torch.dtype, tuple[int, ...]]) -> int:
    dtype, shape = dtype_shape
    return math.prod(shape) * dtype.itemsize


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
    """Keys grouped into shards in order, each at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
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
    return len(raw).to_bytes(8, "little") + raw


def row_blocks(rows: int, row_bytes: int, block_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``block_bytes`` each (at least one row)."""
    step = max(1, block_bytes // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)
