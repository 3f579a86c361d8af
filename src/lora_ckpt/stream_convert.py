"""Deprecated module name, kept so existing imports work: use :mod:`lora_ckpt.streaming`."""

from lora_ckpt.streaming import stream_convert

__all__ = ["stream_convert"]
