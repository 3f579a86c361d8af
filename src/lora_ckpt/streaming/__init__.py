"""Streaming merges and conversions, file to file, with memory bounded by the largest tensor.

Who owns what: :mod:`~lora_ckpt.streaming.writer` how bytes reach the disk (sharded safetensors,
aligned chunks, direct I/O, one writer thread); :mod:`~lora_ckpt.streaming.blocks` how each planned
tensor is produced block by block (CPU or CUDA); :mod:`~lora_ckpt.streaming.merge` and
:mod:`~lora_ckpt.streaming.convert` the two operations. Inputs are read through
:class:`~lora_ckpt.source.Source` and outputs written through :class:`~lora_ckpt.output.Output`.
"""

from lora_ckpt.streaming.convert import stream_convert
from lora_ckpt.streaming.merge import stream_merge
from lora_ckpt.streaming.writer import StreamOptions, StreamReport, parse_size

__all__ = ["StreamOptions", "StreamReport", "parse_size", "stream_convert", "stream_merge"]
