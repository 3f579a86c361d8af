"""Deprecated module name, kept so existing imports work: use :mod:`lora_ckpt.streaming`."""

from lora_ckpt.source import Source as LazySource
from lora_ckpt.streaming import StreamOptions, StreamReport, parse_size, stream_merge

__all__ = ["LazySource", "StreamOptions", "StreamReport", "parse_size", "stream_merge"]
