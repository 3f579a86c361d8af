"""The block merger: produces each planned tensor of a :class:`~lora_ckpt.merge.MergePlan`, row block by row
block, straight into an output file's chunks, on the CPU or on a CUDA device.

A plain copy reads the source bytes straight into the output chunk; a merge computes ``W + s·ΔW`` for a
block of rows into it (:func:`~lora_ckpt.merge.merge_rows`, one rounding). On a GPU, each block is
copied in on one stream, merged on another and copied out, so the next block's read overlaps the merge.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_ckpt.merge import Factors, MergePlan, Step, check_finite, check_scale, merge_rows, module_factors
from lora_ckpt.source import Source
from lora_ckpt.streaming.writer import BufferPool, OutFile, StreamOptions, row_blocks

__all__ = ["BlockMerger"]


class BlockMerger:
    """Produces each planned tensor, block by block, into an output file.

    ``prefix`` goes before the plan's source keys in ``source``; ``device`` is where merges run.
    """

    def __init__(
        self,
        plan: MergePlan,
        source: Source,
        prefix: str,
        device: torch.device | None,
        options: StreamOptions,
    ) -> None:
        self.plan, self.source, self.prefix, self.device = plan, source, prefix, device
        cuda = device is not None and device.type == "cuda"
        self.pool = BufferPool(2, options.block_bytes, pinned=cuda)  # source rows of the block being merged
        streams = options.streams or ((torch.cuda.Stream(device), torch.cuda.Stream(device)) if cuda else (None, None))
        self.copy_stream: Any = streams[0]
        self.compute_stream: Any = streams[1]

    def emit(self, step: Step, meta_out: torch.Tensor, out: OutFile) -> int:
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
            check_scale(step.module.name, step.scale, fac.acc)
            if self.compute_stream is not None:  # the factors were made on the default stream
                self.compute_stream.wait_stream(torch.cuda.current_stream(self.device))
        same = fac is None and src_meta is not None and src_meta.dtype == meta_out.dtype and not step.from_adapter
        written = 0
        for a, b in row_blocks(rows, row_bytes, self.pool.nbytes):
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
                merge_rows(base, fac.left[a:b], fac.right, step.scale, fac.acc, fac.out_dtype, out=flat)
                check_finite(step.module.name if step.module else step.key, flat, base, step.scale)
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
            merged = merge_rows(base_gpu, fac.left[a:b], fac.right, scale, fac.acc, fac.out_dtype)
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
