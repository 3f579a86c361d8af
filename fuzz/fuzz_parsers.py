#!/usr/bin/env python
"""Fuzz every input parser of lora_ckpt: hostile input may only raise lora_ckpt's typed errors.

For each format a seeded mutator derives inputs from valid seeds (files written by lora_ckpt itself and by
the synthetic Llama writers of ``lora_ckpt.testing.llama``) and runs the parser on each under a time limit.
An input passes when the parser accepts it or raises a :class:`lora_ckpt.LoraCkptError`. Anything else
fails: another exception (``KeyError``, ``struct.error``, ``RecursionError``, ``OverflowError`` …, or a
warning, which pytest turns into an error), a parse that runs past the time limit, or a pickle that
manages to run code (it would create a canary file).

Formats (``--format``):

  safetensors     a .safetensors file: byte flips, truncation, splices, header-length edits up to 2**64-1,
                  JSON header mutations (dtypes, shapes, data_offsets, keys, __metadata__), then load + detect
  metadata        lora_ckpt's metadata JSON (``__metadata__["lora_ckpt"]``): FileMeta.from_header alone, then
                  inside a safetensors file through load_checkpoint
  pt_zip          a torch zip checkpoint: bytes, zip members, crafted and exploit data.pkl, mutated
                  checkpoint dicts saved by torch.save
  pickle_legacy   a legacy (pre-zip) torch pickle: the same, in the legacy framing
  index_json      a sharded Hugging Face folder's model.safetensors.index.json: JSON shape, shard names
                  (``../x``, ``/etc/passwd``, links out of the folder, link loops …), damaged shards
  adapter_config  a PEFT adapter folder (adapter_config.json, its weights file) through load_peft_adapter
  ckpt_dict       nanoGPT checkpoint dicts passed to checkpoint_from_dict as Python objects

Every input ``i`` of format ``f`` comes from ``random.Random(f"{seed}/{f}/{i}")``, so one input can be
made again alone: ``--format f --case i`` prints how it was made and what the parser did.

Usage::

  python fuzz/fuzz_parsers.py [--count 10000] [--seed 0] [--format NAME ...] [--timeout 10] [--save DIR] [-v]
                              [--memory-gb 16]
  python fuzz/fuzz_parsers.py --format safetensors --case 1234

Exits 1 when any input failed, 2 when the fuzzer could not make some inputs, 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_ckpt import LoraCkptError, detect_layout, load_checkpoint, save_checkpoint
from lora_ckpt.checkpoint import checkpoint_from_dict
from lora_ckpt.filemeta import META_KEY, FileMeta
from lora_ckpt.formats.peft import load_peft_adapter
from lora_ckpt.testing import make_gpt
from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint

__all__ = ["FORMATS", "Case", "Hang", "LegacyPickleFormat", "Mutator", "PtZipFormat", "Result", "exploit_pickles",
           "parse_warnings", "prepare", "report_failures", "run_case", "run_format", "time_limit"]

NAN, INF = float("nan"), float("inf")


class Raw(str):
    """JSON text written as is (numbers JSON cannot hold exactly, nesting past the parser's limit …)."""


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object written from (key, value) pairs, so a key can appear twice."""


class Hang(BaseException):
    """A parse ran past its time limit (a BaseException, so the parser's ``except Exception`` cannot hide it)."""


# --- hostile values ------------------------------------------------------------------------------------------

INTS = [0, 1, -1, 2, 3, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
        -(2**63), 10**30, 10**400]
FLOATS = [0.0, -0.0, 0.5, 1.5, 8.0, 1e308, 5e-324, NAN, INF, -INF]
RAW_JSON = [Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1" * 5000),
            Raw("-0"), Raw("1E-99999"), Raw('"\\ud800"'), Raw('"\\u0000"'), Raw("[" * 3000 + "]" * 3000),
            Raw('{"a":' * 3000 + "1" + "}" * 3000), Raw("[" * 200_000 + "]" * 200_000)]
NAMES = ["", ".", "..", "../x", "../../../../etc/passwd", "/etc/passwd", "/", "sub/../../x", "sub/../sub/x", "a\0b",
         "C:\\x", "C:x", "\\\\server\\share\\x", "x" * 300, "sub/" + "y" * 300, "ü.safetensors", "\udcff", " ",
         "~/x", "$HOME/x", "sub/", "./x", "x\n"]
STRINGS = ["", "x", "F32", "weight", "lora", "NaN", "\udcff", "\0", "é" * 10, "x" * 10_000, *NAMES[:8]]
SCALARS: list[Any] = [None, True, False, *INTS, *FLOATS, *STRINGS, [], {}, [1, 2], {"a": 1}, [[]], [None], {"": None}]
# suffixes and prefixes of every LoRA layout lora_ckpt reads, to steer renamed keys into layout detection
KEY_AFFIXES = ["_orig_mod.", "module.", "base_model.model.", "module._orig_mod.", ".weight", ".bias", ".lora_A.weight",
               ".lora_B.weight", ".main_weight.weight", ".main_weight.bias", ".lora_down.weight", ".lora_up.weight",
               ".alpha", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B", ".base_layer.weight",
               ".lora_a.weight", ".lora_b.weight", ".magnitude", ".parametrizations.weight.0.lora_A",
               ".parametrizations.weight.original", ".lora_A", ".lora_B", ".lora_A.default.weight", ".lora_bias",
               ".lora_B.bias", ".hada_w1_a", ".lokr_w1", ".ia3_l"]
KEYS = ["", ".", "..", "a..b", ".x", "x.", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha", "transformer.h.0.attn.bias", "lm_head.weight",
        "x" * 5000, "\udcff", "é", "a\0b", "model", "state_dict", "lora_ckpt", "model_args", "__metadata__"]


def _short(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# --- JSON and object trees -----------------------------------------------------------------------------------

def dump_json(value: Any) -> str:
    """JSON text of ``value``; NaN and infinities as JavaScript names, :class:`Raw` as is, :class:`Pairs` as objects."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dump_json(v) for k, v in value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dump_json(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dump_json(v) for v in value) + "]"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return json.dumps(value)


def _children(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, (Raw, Pairs)):
        return []
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    return []


def nodes(root: Any, limit: int = 5000) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, value) of the first ``limit`` nodes of a tree of dicts, lists and tuples, root first."""
    out = [((), root)]
    todo = [((), root)]
    while todo and len(out) < limit:
        path, value = todo.pop()
        for k, v in _children(value):
            out.append((path + (k,), v))
            todo.append((path + (k,), v))
    return out


def get_at(root: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        root = root[k]
    return root


def replace_at(root: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``root`` with ``new`` at ``path``; only the containers on the path are copied."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    child = replace_at(root[head], rest, new) if rest else new
    if isinstance(root, dict):
        out = root.copy()
        out[head] = child
        return out
    if isinstance(root, list):
        out = list(root)
        out[head] = child
        return out
    return tuple(child if i == head else v for i, v in enumerate(root))


def _dict_set(d: dict[Any, Any], key: Any, value: Any) -> dict[Any, Any]:
    out = d.copy()
    out[key] = value
    return out


def deep(kind: str, depth: int) -> Any:
    """A list, tuple or dict nested ``depth`` deep, built without recursion."""
    value: Any = 0
    for _ in range(depth):
        value = [value] if kind == "list" else (value,) if kind == "tuple" else {"k": value}
    return value


def dag(kind: str, depth: int) -> Any:
    """A value that shares itself twice per level: 2**depth paths through ``depth + 1`` objects."""
    value: Any = ()
    for _ in range(depth):
        value = [value, value] if kind == "list" else (value, value)
    return value


class Mutator:
    """Seeded mutations of bytes, JSON trees and Python object trees."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # -- bytes ---------------------------------------------------------------------------------------------
    def bytes(self, data: bytes, *, focus: tuple[int, int] | None = None, others: list[bytes] | None = None,
              rounds: int | None = None) -> tuple[bytes, str]:
        """``data`` with 1-10 byte-level edits, half of them inside ``focus`` (a byte range) where given."""
        r = self.rng
        buf = bytearray(data)
        done = []
        for _ in range(rounds or r.choice([1, 1, 1, 2, 2, 3, 5, 10])):
            if not buf:
                buf.extend(r.randbytes(r.randint(1, 16)))
            lo, hi = (focus if focus and r.random() < 0.5 else (0, len(buf)))
            hi = max(lo + 1, min(hi, len(buf)))
            pos = r.randrange(lo, hi) if lo < len(buf) else r.randrange(len(buf))
            op = r.randrange(11)
            if op == 0:
                buf[pos] ^= 1 << r.randrange(8)
                done.append(f"flip@{pos}")
            elif op == 1:
                buf[pos] = r.choice([0, 1, 0x7F, 0x80, 0xFF, *b'{}"\\.9'])
                done.append(f"set@{pos}")
            elif op == 2:
                cut = r.randrange(len(buf) + 1)
                del buf[cut:]
                done.append(f"truncate@{cut}")
            elif op == 3:
                chunk = r.randbytes(r.randint(1, 32))
                buf[pos:pos] = chunk
                done.append(f"insert{len(chunk)}@{pos}")
            elif op == 4:
                n = r.randint(1, 64)
                del buf[pos : pos + n]
                done.append(f"delete{n}@{pos}")
            elif op == 5:
                n = r.randint(1, 64)
                buf[pos:pos] = buf[pos : pos + n]
                done.append(f"dup{n}@{pos}")
            elif op == 6:
                width = r.choice([1, 2, 4, 8])
                value = r.choice(INTS + [len(buf), len(buf) - pos, r.randrange(2**32)]) % (1 << (8 * width))
                buf[pos : pos + width] = value.to_bytes(width, r.choice(["little", "big"]))
                done.append(f"int{width}@{pos}")
            elif op == 7 and others:
                other = r.choice(others)
                j = r.randrange(len(other) + 1)
                buf[pos:] = other[j : j + r.randint(0, len(other))]
                done.append(f"splice@{pos}")
            elif op == 8:
                token = r.choice([b"{", b"}", b"[", b"]", b'"', b"\\", b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80",
                                  b"NaN", b"1e999", b"..", b"/", b"\0", b",", b":", b"-", b"PK\x03\x04"])
                buf[pos:pos] = token
                done.append(f"token@{pos}")
            elif op == 9:
                j = r.randrange(len(buf))
                buf[pos], buf[j] = buf[j], buf[pos]
                done.append(f"swap@{pos},{j}")
            else:
                n = r.randint(1, 256)
                buf[pos : pos + n] = bytes(n) if r.random() < 0.5 else b"\xff" * n
                done.append(f"fill{n}@{pos}")
        return bytes(buf), "bytes " + " ".join(done)

    # -- trees ---------------------------------------------------------------------------------------------
    def tree(self, root: Any, pool: list[Any], *, keys: list[str] | None = None,
             special: Callable[[Any, random.Random], tuple[Any, str] | None] | None = None,
             rounds: int | None = None) -> tuple[Any, str]:
        """``root`` (JSON or Python containers) with 1-4 structural edits; ``pool`` values replace nodes.

        ``special(root, rng)`` may offer a format-aware edit (return None to decline).
        """
        r = self.rng
        done = []
        for _ in range(rounds or r.choice([1, 1, 2, 2, 3, 4])):
            try:
                root = self._edit(root, pool, keys, special, done)
            except Exception as e:  # noqa: BLE001 - an edit that does not apply to this tree is skipped
                done.append(f"(skipped an edit: {type(e).__name__})")
        return root, "tree " + "; ".join(done)

    def _edit(self, root: Any, pool: list[Any], keys: list[str] | None,
              special: Callable[[Any, random.Random], tuple[Any, str] | None] | None, done: list[str]) -> Any:
        """One edit of ``root`` (described in ``done``); returns the new root."""
        r = self.rng
        if special is not None and r.random() < 0.3:
            got = special(root, r)
            if got is not None:
                root, what = got
                done.append(what)
                return root
        all_nodes = nodes(root)
        path, value = r.choice(all_nodes)
        containers = [(p, v) for p, v in all_nodes if isinstance(v, dict) and not isinstance(v, Pairs)]
        op = r.randrange(10)
        where = "/".join(_short(str(k), 40) for k in path) or "<root>"
        if op <= 2:
            new = self.pick(pool)
            root = replace_at(root, path, new)
            done.append(f"set {where}={_short(repr(new), 40)}")
        elif op == 3 and path:
            parent_path, last = path[:-1], path[-1]
            parent = get_at(root, parent_path)
            if isinstance(parent, dict):
                new_parent: Any = parent.copy()
                del new_parent[last]
            else:
                new_parent = type(parent)(v for i, v in enumerate(parent) if i != last)
            root = replace_at(root, parent_path, new_parent)
            done.append(f"delete {where}")
        elif op == 4 and containers:
            cpath, c = r.choice(containers)
            old = r.choice(list(c)) if c else "x"
            key = self.key_like(old, keys)
            root = replace_at(root, cpath, _dict_set(c, key, self.pick(pool) if r.random() < 0.5 else c.get(old)))
            done.append(f"add {'/'.join(map(str, cpath))}[{_short(repr(key), 40)}]")
        elif op == 5 and containers:
            cpath, c = r.choice(containers)
            if c:
                old = r.choice(list(c))
                key = self.key_like(old, keys)
                renamed = type(c)((key if k == old else k, v) for k, v in c.items())
                root = replace_at(root, cpath, renamed)
                done.append(f"rename {_short(repr(old), 40)}->{_short(repr(key), 40)}")
        elif op == 6:
            root = replace_at(root, path, self.reshape_value(value))
            done.append(f"retype {where}")
        elif op == 7 and isinstance(value, list) and value:
            i = r.randrange(len(value))
            choice = r.randrange(3)
            edits = [value + [value[i]], value[:i] + value[i + 1 :], r.sample(value, len(value))]
            new_list = edits[choice]
            root = replace_at(root, path, new_list)
            done.append(f"list-edit{choice} {where}")
        elif op == 8:
            root = replace_at(root, path, r.choice([[value], {"x": value}, {"": value}]))
            done.append(f"wrap {where}")
        else:
            inner = nodes(value, 200)
            root = replace_at(root, path, r.choice(inner)[1] if len(inner) > 1 else self.pick(pool))
            done.append(f"hoist {where}")
        return root

    def pick(self, pool: list[Any]) -> Any:
        return self.rng.choice(pool) if self.rng.random() < 0.6 else self.rng.choice(SCALARS)

    def key_like(self, old: Any, keys: list[str] | None) -> Any:
        r = self.rng
        old = old if isinstance(old, str) else "x"
        choice = r.randrange(6)
        if choice == 0:
            return r.choice(KEYS)
        if choice == 1 and keys:
            return r.choice(keys)
        affix = r.choice(KEY_AFFIXES)
        if choice == 2:
            return affix + old if not affix.startswith(".") else old + affix
        if choice == 3:
            stem = old.rsplit(".", 1)[0] if "." in old else old
            return stem + affix if affix.startswith(".") else affix + stem
        if choice == 4:
            return old.upper() if r.random() < 0.5 else old + r.choice(["\0", "\udcff", ".", " ", "é"])
        return old[: r.randrange(len(old) + 1)]

    def reshape_value(self, value: Any) -> Any:
        """The same information in another JSON/Python type (object <-> array, number <-> string …)."""
        r = self.rng
        if isinstance(value, dict):
            return r.choice([list(value.values()), list(value), Pairs(list(value.items()) * 2), str(value)])
        if isinstance(value, (list, tuple)):
            return r.choice([{str(i): v for i, v in enumerate(value)}, tuple(value), list(value) * 2, len(value),
                             value[:1] * 3])
        if isinstance(value, bool):
            return r.choice([int(value), str(value).lower(), None])
        if isinstance(value, int):
            return r.choice([str(value), float(value) if abs(value) < 2**1000 else INF, -value, value + 1, value - 1,
                             value * 2**40, [value], True])
        if isinstance(value, float):
            as_int = int(value) if math.isfinite(value) else 10**400
            return r.choice([str(value), -value, value * 1e300, as_int, [value]])
        if isinstance(value, str):
            number = int(value) if value.isascii() and value.isdigit() and len(value) < 4000 else 0
            return r.choice([[value], value * 2, value[::-1], value.encode("utf-8", "surrogatepass").decode("latin-1"),
                             "../" + value, "/" + value, value + "\0", number])
        return r.choice(SCALARS)


# --- tensors -----------------------------------------------------------------------------------------------

def tensor_pool() -> list[torch.Tensor]:
    """Tensors a weights-only pickle can hold: odd shapes and dtypes, meta, sparse, quantized, nested, views."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prototype / deprecation notes of sparse CSR, nested and quantized tensors
        base = torch.arange(16.0).reshape(4, 4)
        shapes = [(), (0,), (0, 3), (3, 0), (2, 2, 2), (1, 1, 1, 1), (4, 8, 1, 1), (8, 2, 3, 3), (1, 1, 1, 1, 1, 1)]
        dtypes = [torch.bool, torch.int64, torch.uint8, torch.complex64, torch.float16, torch.bfloat16]
        pool = [*(torch.zeros(s) for s in shapes), *(torch.ones(4, 4, dtype=d) for d in dtypes),
                torch.ones(4, 4).to(torch.float8_e4m3fn), torch.empty(4, 4, device="meta"), base.to_sparse(),
                base.to_sparse_csr(), torch.quantize_per_tensor(base, 0.1, 0, torch.qint8),
                torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]), base.t(), base[1:, 1:], base[::2],
                torch.zeros(1).expand(2**31, 2**31), torch.nn.Parameter(torch.zeros(2, 2))]
    return pool


def tensor_variants(t: torch.Tensor, rng: random.Random, others: list[torch.Tensor]) -> torch.Tensor:
    """``t`` in another shape, dtype or kind, or another tensor of the same dict (a tie)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        choice = rng.randrange(12)
        if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type == "meta":
            return rng.choice(others)
        if choice == 0 and t.dim() == 2:
            return t.t()
        if choice == 1 and t.dim() >= 1:
            return t[:1]
        if choice == 2:
            return t.reshape(-1)
        if choice == 3:
            return t.unsqueeze(0)
        if choice == 4:
            return t.unsqueeze(-1).unsqueeze(-1)
        if choice == 5:
            return t.to(rng.choice([torch.half, torch.bfloat16, torch.int8, torch.bool, torch.double, torch.cfloat]))
        if choice == 6:
            return t.to("meta")
        if choice == 7 and t.dim() == 2 and t.numel():
            return t.to_sparse()
        if choice == 8:
            return rng.choice(others)  # a tie
        if choice == 9 and t.numel() > 1:
            return t.reshape(-1)[1:]  # a view sharing storage at an offset
        if choice == 10 and t.dim() == 2:
            return torch.zeros(t.shape[0] + 1, t.shape[1])
        return rng.choice(tensor_pool_cache())


_POOL: list[torch.Tensor] = []


def tensor_pool_cache() -> list[torch.Tensor]:
    if not _POOL:
        _POOL.extend(tensor_pool())
    return _POOL


def mutate_checkpoint(mut: Mutator, obj: Any, *, bombs: bool = True) -> tuple[Any, str]:
    """A nanoGPT checkpoint dict (or state dict) with structural edits, tensor edits and, last, maybe a bomb."""
    r = mut.rng
    done = []
    pool: list[Any] = [*tensor_pool_cache(), *SCALARS, set(), {1, 2}, frozenset({"a"}), b"bytes", bytearray(b"x"),
                       complex(1, 2), torch.Size([2, 2]), torch.float32, torch.device("cpu"), ("a", 1), 10**1000]

    def special(root: Any, rng: random.Random) -> tuple[Any, str] | None:
        tensors = [(p, v) for p, v in nodes(root) if isinstance(v, torch.Tensor)]
        if not tensors:
            return None
        path, t = rng.choice(tensors)
        others = [v for _, v in tensors]
        return replace_at(root, path, tensor_variants(t, rng, others)), f"tensor {'/'.join(map(str, path))}"

    keys = [k for k in obj.get("model", obj) if isinstance(k, str)] if isinstance(obj, dict) else []
    obj, what = mut.tree(obj, pool, keys=keys, special=special)
    done.append(what)
    if bombs and r.random() < 0.1:
        all_nodes = nodes(obj)
        path, _ = r.choice(all_nodes)
        kind = r.choice(["list", "tuple", "dict", "dag-list", "dag-tuple", "cycle", "bigint", "bigstr"])
        if kind.startswith("dag"):
            bomb: Any = dag(kind[4:], r.randint(10, 20))
        elif kind == "cycle":
            bomb = []
            bomb.append(bomb)
        elif kind == "bigint":
            bomb = 7 ** r.randint(2000, 20000)
        elif kind == "bigstr":
            bomb = "x" * r.choice([10**5, 10**6])
        else:
            bomb = deep(kind, r.choice([100, 1000, 5000, 50_000]))
        as_key = r.random() < 0.3 and kind in ("tuple", "dag-tuple", "bigint", "bigstr")
        parent = get_at(obj, path)
        if as_key and isinstance(parent, dict):
            obj = replace_at(obj, path, _dict_set(parent, bomb, 1))
        else:
            obj = replace_at(obj, path, bomb)
        done.append(f"bomb {kind}{' key' if as_key else ''} at {'/'.join(map(str, path)) or '<root>'}")
    return obj, "; ".join(done)


# --- pickles -----------------------------------------------------------------------------------------------

def _unicode(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def _short_unicode(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def exploit_pickles(canary: Path) -> list[tuple[str, bytes]]:
    """Pickles that would create ``canary`` if anything ran their code: GLOBAL/STACK_GLOBAL/INST/OBJ/NEWOBJ/BUILD."""
    cmd = f"touch {canary}"
    code = f"open({str(canary)!r}, 'w').close()"
    calls = [("os", "system", cmd), ("posix", "system", cmd), ("builtins", "exec", code),
             ("builtins", "eval", f"exec({code!r})"), ("subprocess", "getoutput", cmd), ("pty", "spawn", cmd),
             ("torch.serialization", "os.system", cmd),
             ("builtins", "getattr", "system"), ("__builtin__", "execfile", str(canary)), ("nt", "system", cmd)]
    out = []
    for mod, name, arg in calls:
        out.append((f"GLOBAL {mod}.{name}", b"\x80\x02c" + f"{mod}\n{name}\n".encode() + _unicode(arg) + b"\x85R."))
        out.append((f"STACK_GLOBAL {mod}.{name}",
                    b"\x80\x04" + _short_unicode(mod) + _short_unicode(name) + b"\x93" + _unicode(arg) + b"\x85R."))
        out.append((f"INST {mod}.{name}", b"(" + _unicode(arg) + b"i" + f"{mod}\n{name}\n".encode() + b"."))
        out.append((f"OBJ {mod}.{name}", b"(c" + f"{mod}\n{name}\n".encode() + _unicode(arg) + b"o."))
        out.append((f"NEWOBJ {mod}.{name}", b"\x80\x02c" + f"{mod}\n{name}\n".encode() + _unicode(arg) + b"\x85\x81."))
    # allowed globals as gadgets: OrderedDict BUILD with a __reduce__ state, a Tensor rebuild calling os.system
    out.append(("BUILD OrderedDict __dict__", b"\x80\x02ccollections\nOrderedDict\n)R}" + _unicode("__reduce__")
                + b"cos\nsystem\ns\x86b."))
    out.append(("rebuild_from_type os.system", b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(cos\nsystem\n"
                + b"ctorch\nTensor\n(" + _unicode(cmd) + b"t}tR."))
    out.append(("EXT1", b"\x80\x02\x82\x01" + _unicode(cmd) + b"\x85R."))
    out.append(("PERSID", b"\x80\x02P" + cmd.encode() + b"\n."))
    for proto in range(6):
        out.append((f"pickle.dumps reduce proto {proto}", pickle.dumps(_Exploit(cmd), protocol=proto)))
    return out


class _Exploit:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.cmd,))


PLACEHOLDER = "\x01fuzz-placeholder\x01"


def crafted_values(rng: random.Random) -> tuple[bytes, str]:
    """Pickle opcodes that push one hostile object: deep or shared nesting, cycles, huge ints, NaN, big strings."""
    kind = rng.choice(["deep-list", "deep-tuple", "deep-dict", "dag-tuple", "dag-list", "cycle", "bigint", "nan", "inf",
                       "bigstr", "set", "bytes", "complex", "bool", "none"])
    n = rng.choice([100, 1000, 10_000, 100_000])
    base = 1_000_000
    if kind == "deep-list":
        ops = b"(" * n + b"l" * n
    elif kind == "deep-tuple":
        # capped: as a dict key, a tuple 1,000,000 deep crashes CPython's tuple hash (SIGSEGV) inside torch's
        # unpickler, before lora_ckpt sees anything (known, see the campaign's report)
        n = min(n, 10_000)
        ops = b"(" * n + b"t" * n
    elif kind == "deep-dict":
        ops = (b"(" + _unicode("k")) * n + b"}" + b"d" * n
    elif kind == "dag-tuple":
        n = rng.randint(8, 20)  # capped: a key of 2**40 paths hangs torch's unpickler hashing it (known, as above)
        ops = b")" + b"".join(_put(base + i) + _get(base + i) + b"\x86" for i in range(n))
    elif kind == "dag-list":
        n = rng.randint(8, 20)
        ops = b"]" + b"".join(_put(base + i) + b"0](" + _get(base + i) + _get(base + i) + b"e" for i in range(n))
    elif kind == "cycle":
        ops = b"}" + _put(base) + _unicode("self") + _get(base) + b"s"
    elif kind == "bigint":
        n = rng.choice([9, 200, 2000, 100_000])
        ops = b"\x8b" + struct.pack("<i", n) + rng.randbytes(n)
    elif kind in ("nan", "inf"):
        ops = b"G" + struct.pack(">d", NAN if kind == "nan" else rng.choice([INF, -INF]))
    elif kind == "bigstr":
        ops = _unicode("x" * rng.choice([10**5, 10**6]))
    elif kind == "set":
        ops = b"cbuiltins\nset\n]\x85R"
    elif kind == "bytes":
        ops = b"c_codecs\nencode\n" + _unicode("abc") + _unicode("latin1") + b"\x86R"
    elif kind == "complex":
        ops = b"cbuiltins\ncomplex\nG" + struct.pack(">d", 1.0) + b"G" + struct.pack(">d", NAN) + b"\x86R"
    elif kind == "bool":
        ops = rng.choice([b"\x88", b"\x89"])
    else:
        ops = b"N"
    return ops, f"crafted {kind} {n}"


def splice_placeholder(data: bytes, ops: bytes) -> bytes:
    """``data`` (pickle bytes) with the BINUNICODE of :data:`PLACEHOLDER` replaced by ``ops``."""
    token = _unicode(PLACEHOLDER)
    assert token in data, "placeholder not found in the pickle"
    return data.replace(token, ops, 1)


def save_spliced(obj: Any, ops: bytes, *, zip_format: bool) -> bytes:
    """``torch.save`` of ``obj`` (holding :data:`PLACEHOLDER` once), the placeholder's opcodes replaced by ``ops``."""
    raw = torch_save_bytes(obj, zip_format=zip_format)
    if not zip_format:
        return splice_placeholder(raw, ops)
    return build_zip([(n, splice_placeholder(b, ops) if n.endswith("/data.pkl") else b) for n, b in zip_members(raw)])


def place_placeholder(mut: Mutator, obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``obj`` with :data:`PLACEHOLDER` as a value or a key somewhere a parser looks."""
    r = mut.rng
    spots = [("value", ()), ("key", ()), ("value", ("model_args", "lora_alpha")), ("value", ("model_args",)),
             ("value", (META_KEY,)), ("value", (META_KEY, "alpha")), ("value", (META_KEY, "tied")),
             ("value", (META_KEY, "aliases")), ("key", ("model",)), ("value", ("model",)), ("key", (META_KEY, "alpha"))]
    kind, path = r.choice(spots)
    try:
        parent = get_at(obj, path[:-1]) if kind == "value" and path else obj
        target = get_at(obj, path) if kind == "key" else None
    except (KeyError, TypeError, IndexError):
        return _dict_set(obj, "x", PLACEHOLDER), "placeholder at x"
    if kind == "key" and isinstance(target, dict):
        new = _dict_set(target, PLACEHOLDER, r.choice([1, torch.zeros(2)]))
        return replace_at(obj, path, new), f"placeholder key in {path}"
    if kind == "value" and path and isinstance(parent, dict):
        return replace_at(obj, path, PLACEHOLDER), f"placeholder at {path}"
    return _dict_set(obj, "x", PLACEHOLDER), "placeholder at x"


def torch_save_bytes(obj: Any, *, zip_format: bool) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def build_zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name, payload in members:
                z.writestr(name, payload)
    return buf.getvalue()


# --- cases and results -------------------------------------------------------------------------------------

@dataclass
class Case:
    """One input: how it was made, and the parser call on it."""

    what: str
    parse: Callable[[], object]


@dataclass
class Result:
    """What one format's inputs did."""

    name: str
    tried: int = 0
    typed: int = 0
    accepted: int = 0
    other: int = 0
    hangs: int = 0
    code_runs: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)  # typed error class -> count
    samples: dict[str, str] = field(default_factory=dict)  # typed error class -> one message
    long_messages: int = 0  # typed errors of more than one line or MAX_MESSAGE characters
    unmade: list[str] = field(default_factory=list)  # inputs the fuzzer itself failed to make (its own bugs)
    failures: dict[str, list[str]] = field(default_factory=dict)  # signature -> [traceback, case, ...]

    @property
    def failed(self) -> int:
        return self.other + self.hangs + self.code_runs


MAX_MESSAGE = 2000


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "lora_ckpt" in f.filename and "fuzz" not in f.filename]
    f = (ours or frames or [None])[-1]
    where = f"{Path(f.filename).name}:{f.lineno}" if f is not None else "?"
    return f"{type(exc).__name__} at {where}"


_ARMED = {"on": False}
#: Where the input being parsed is named, for a hang that ends the campaign (see :func:`time_limit`).
CURRENT_INPUT: list[Path] = []


def _on_watchdog(signum: int, frame: object) -> None:
    if _ARMED["on"]:
        _ARMED["on"] = False
        raise Hang("no answer within the time limit")


def _watch(seconds: float, target: int, done: threading.Event) -> None:
    if not done.wait(seconds):
        signal.pthread_kill(target, signal.SIGUSR1)


@contextlib.contextmanager
def time_limit(seconds: float, label: str = "a parse") -> Iterator[None]:
    """Raise :class:`Hang` in this (main) thread once ``seconds`` have passed; end the process if that cannot work.

    Three clocks, none of them SIGALRM (which lora_ckpt's pattern matching uses for its own limit): SIGPROF
    after ``seconds`` of CPU time (delivered by the kernel, so it reaches a regex that holds the GIL); a
    watchdog thread that sends SIGUSR1 after ``seconds`` of wall time (a blocked ``open`` of a FIFO uses
    no CPU); and faulthandler, which prints every thread's stack and exits after three times as long,
    for a loop in C that never looks at signals. ``label`` is written to :data:`CURRENT_INPUT` first.
    """
    if CURRENT_INPUT:
        CURRENT_INPUT[0].write_text(label + "\n")
    previous = {sig: signal.signal(sig, _on_watchdog) for sig in (signal.SIGUSR1, signal.SIGPROF)}
    done = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(seconds, threading.get_ident(), done), daemon=True)
    _ARMED["on"] = True
    signal.setitimer(signal.ITIMER_PROF, seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    watchdog.start()
    try:
        yield
    finally:
        _ARMED["on"] = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        faulthandler.cancel_dump_traceback_later()
        done.set()
        watchdog.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def parse_warnings() -> Iterator[None]:
    """Warnings as errors, as pytest runs this project (``filterwarnings = error``), but one.

    torch.load warns about any pickle protocol above 2 ("Detected pickle protocol 4 in the checkpoint …
    the weights_only Unpickler might not support all instructions"). As an error it stops torch.load
    before it unpickles anything, so the exploit pickles of protocols 3-5 would never reach the
    unpickler that must refuse them; it is ignored here so they do.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


def run_case(case: Case, result: Result, *, timeout: float, canary: Path, index: int) -> str:
    """Run one case, count it in ``result``; returns "accepted", "typed", "other", "hang" or "code"."""
    result.tried += 1
    outcome = "accepted"
    try:
        with parse_warnings(), time_limit(timeout, f"{result.name} input {index}"):
            case.parse()
        result.accepted += 1
    except LoraCkptError as e:
        result.typed += 1
        outcome = "typed"
        name = type(e).__name__
        result.errors[name] += 1
        result.samples.setdefault(name, _short(str(e), 300))
        text = str(e)
        if "Warning: " in text:
            result.samples.setdefault("from a warning", _short(text, 300))
        if "\n" in text or len(text) > MAX_MESSAGE:
            result.long_messages += 1
            result.samples.setdefault("long message", _short(text, 300))
    except Hang as e:
        result.hangs += 1
        outcome = "hang"
        _record(result, f"hang ({_signature(e)})", e, case, index)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - every other exception is what the campaign looks for
        result.other += 1
        outcome = "other"
        _record(result, _signature(e), e, case, index)
    if canary.exists():
        result.code_runs += 1
        outcome = "code"
        canary.unlink()
        result.failures.setdefault("code ran (canary file created)", []).append(f"input {index}: {case.what}")
    return outcome


def _record(result: Result, signature: str, exc: BaseException, case: Case, index: int) -> None:
    seen = result.failures.get(signature)
    if seen is None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-12))
        result.failures[signature] = [_short(tb, 6000), f"input {index}: {_short(case.what, 400)}"]
    elif len(seen) < 6:
        seen.append(f"input {index}: {_short(case.what, 400)}")


# --- formats -----------------------------------------------------------------------------------------------

@dataclass
class Seeds:
    """Valid inputs every format starts from, written once per campaign."""

    root: Path
    canary: Path
    lora_sd: dict[str, torch.Tensor]
    plain_sd: dict[str, torch.Tensor]
    safetensors: dict[str, bytes]
    pt_objects: dict[str, Any]
    llama: Path
    adapter: Path
    outside: Path


def prepare(root: Path) -> Seeds:
    """Write the seeds under ``root``: safetensors and .pt files, a sharded Llama folder, a PEFT adapter."""
    root.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = make_gpt(attn_rank=2, wte_rank=2, alpha=8.0, randomize=True).state_dict()
        plain = make_gpt(seed=1).state_dict()
        files = root / "seeds"
        files.mkdir()
        model_args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "bias": True, "vocab_size": 64,
                      "dropout": 0.0, "lora_rank": 2, "lora_alpha": 8.0}
        save_checkpoint(files / "lora.safetensors", lora, alpha=8.0, extra={"model_args": model_args})
        save_checkpoint(files / "plain.safetensors", plain)
        odd = {"scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4), "half": torch.ones(3, 2, dtype=torch.float16),
               "bf": torch.ones(2, 2, dtype=torch.bfloat16), "i64": torch.arange(5),
               "flag": torch.ones(3, dtype=torch.bool), "f8": torch.ones(2, 2).to(torch.float8_e4m3fn),
               "bytes": torch.arange(7, dtype=torch.uint8)}
        save_checkpoint(files / "odd.safetensors", odd)
        from safetensors.torch import save_file

        save_file({}, str(files / "empty.safetensors"))
        st = {p.stem: p.read_bytes() for p in sorted(files.glob("*.safetensors"))}
        optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 32)}},
                     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]}
        save_checkpoint(files / "lora.pt", lora, alpha=8.0,
                        extra={"model_args": model_args, "iter_num": 7, "best_val_loss": 1.25, "optimizer": optimizer,
                               "config": {"dataset": "shakespeare_char", "lora_alpha": 8.0}})
        torch.save(plain, files / "plain.pt")
        torch.save({"state_dict": lora, "epoch": 1}, files / "lightning.pt")
        objects = {p.stem: torch.load(p, weights_only=True) for p in sorted(files.glob("*.pt"))}
        shape = LlamaShape(hidden=32, intermediate=64, layers=1, vocab=64)
        llama = write_llama_checkpoint(root / "llama", shape, dtype=torch.float32, shard_bytes=20000)
        adapter = write_llama_adapter(root / "adapter", shape, rank=2)
        outside = root / "outside"
        outside.mkdir()
        shutil.copy(next(llama.glob("*.safetensors")), outside / "stolen.safetensors")
        (outside / "secret.txt").write_text("not for you")
    return Seeds(root, root / "pwned", lora, plain, st, objects, llama, adapter, outside)


class Format:
    """One input format: makes case ``i`` from its own seeded random generator."""

    name = ""
    about = ""

    def __init__(self, seeds: Seeds) -> None:
        self.seeds = seeds

    def case(self, mut: Mutator, work: Path) -> Case:
        raise NotImplementedError


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _safetensors_bytes(header: Any, data: bytes, *, length: int | None = None) -> bytes:
    raw = (header if isinstance(header, str) else dump_json(header)).encode("utf-8", "surrogatepass")
    n = len(raw) if length is None else length
    return n.to_bytes(8, "little") + raw + data


def _load_and_detect(path: Path) -> object:
    ckpt = load_checkpoint(path)
    return detect_layout(ckpt.state_dict)


HEADER_POOL: list[Any] = ["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "U64", "F4", "f32", "C64", "", "F32\0",
                          ["F32"], {"dtype": "F32"}, [], [0], [-1], [2**63], [2**64], [0, 2**70], [1.5], ["2"], [True],
                          [1] * 80, [10**30, 0], [0, 0, 0], [4, 0], [0, 2**64], [-4, 0], [0, 2**63 - 1],
                          [2**62, 2**62 + 4], {"format": "pt"}, {"format": ["pt"]}, {"lora_ckpt": 5},
                          {"lora_ckpt": "{"}, {"lora_ckpt": "[]"},
                          {"lora_ckpt": "null"}, {"lora_ckpt": '{"format_version": 2}'}, *RAW_JSON]


class SafetensorsFormat(Format):
    name = "safetensors"
    about = "Source.open / load_checkpoint on a .safetensors file, then detect_layout"

    def __init__(self, seeds: Seeds) -> None:
        super().__init__(seeds)
        self.parsed = {k: _split_safetensors(v) for k, v in seeds.safetensors.items()}

    def case(self, mut: Mutator, work: Path) -> Case:
        r = mut.rng
        name = r.choice(list(self.parsed))
        raw = self.seeds.safetensors[name]
        header, data = self.parsed[name]
        n = int.from_bytes(raw[:8], "little")
        strategies = ["bytes", "header", "length", "data", "header-bytes", "valid"]
        strategy = r.choices(strategies, [25, 35, 10, 10, 10, 10])[0]
        if strategy == "valid":
            out, what = self._valid_edit(mut, header, data)
        elif strategy == "bytes":
            out, what = mut.bytes(raw, focus=(0, 8 + n), others=list(self.seeds.safetensors.values()))
        elif strategy == "header":
            new, what = mut.tree(header, HEADER_POOL, keys=list(header), special=_header_edit)
            text = dump_json(new)
            length = None if r.random() < 0.9 else r.choice([n, len(text) + r.randint(-8, 8)])
            out = _safetensors_bytes(text, data, length=max(0, length) if length is not None else None)
        elif strategy == "length":
            size = len(raw)
            value = r.choice([0, 1, 7, 8, n - 1, n + 1, size - 8, size - 7, size, 2**32, 100_000_000, 100_000_001,
                              2**63 - 1, 2**63, 2**63 + n, 2**64 - 1]) % 2**64
            out, what = value.to_bytes(8, "little") + raw[8:], f"length {value}"
        elif strategy == "data":
            cut = r.choice([0, 1, len(data) // 2, max(0, len(data) - 1), len(data) + 1, len(data) + 4096])
            tail = data[:cut] if cut <= len(data) else data + bytes(cut - len(data))
            out, what = raw[: 8 + n] + tail, f"data {len(data)} -> {len(tail)} bytes"
        else:
            text, what = mut.bytes(raw[8 : 8 + n], others=[raw[8 : 8 + n]])
            out = len(text).to_bytes(8, "little") + text + data
            what = "header-" + what
        path = work / r.choice(["m.safetensors", "m.pt", "m", "model.bin"])
        path.write_bytes(out)
        return Case(f"{name}: {strategy}: {what}", lambda: _load_and_detect(path))

    @staticmethod
    def _valid_edit(mut: Mutator, header: dict[str, Any], data: bytes) -> tuple[bytes, str]:
        """A file that is still valid safetensors: tensors renamed (towards other layouts), swapped or reshaped
        to as many elements, data bytes changed (NaN, infinities, denormals in the values)."""
        r = mut.rng
        header, done = dict(header), []
        for _ in range(r.randint(1, 3)):
            entries = [k for k in header if k != "__metadata__"]
            if not entries:
                break
            key, op = r.choice(entries), r.randrange(4)
            if op == 0:
                new = mut.key_like(key, entries)
                if new not in header and new != "__metadata__":
                    header = {new if k == key else k: v for k, v in header.items()}
                    done.append(f"rename {key} -> {_short(repr(new), 60)}")
            elif op == 1:
                other = r.choice(entries)
                header[key], header[other] = header[other], header[key]
                done.append(f"swap {key} <-> {other}")
            elif op == 2:
                shape = header[key]["shape"]
                numel = math.prod(shape)
                new_shape = r.choice([list(reversed(shape)), [numel], shape + [1], [1] + shape, shape + [1, 1]])
                header[key] = {**header[key], "shape": new_shape}
                done.append(f"reshape {key} {shape} -> {new_shape}")
            elif data:
                buf = bytearray(data)
                for _ in range(r.randint(1, 16)):
                    buf[r.randrange(len(buf))] = r.randrange(256)
                data = bytes(buf)
                done.append("data bytes")
        return _safetensors_bytes(header, data), "; ".join(done)


def _header_edit(header: Any, rng: random.Random) -> tuple[Any, str] | None:
    """Header edits that keep the JSON valid: reshape a tensor to another shape of as many elements, swap
    names, share or shift data_offsets, drop an entry."""
    if not isinstance(header, dict):
        return None
    entries = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not entries:
        return None
    key = rng.choice(entries)
    info = dict(header[key])
    shape = info.get("shape")
    op = rng.randrange(5)
    if op == 0 and isinstance(shape, list) and all(isinstance(d, int) for d in shape):
        numel = math.prod(shape)
        options = [list(reversed(shape)), [numel], shape + [1], [1] + shape, shape + [1, 1], [numel, 1, 1, 1],
                   [0] + shape]
        info["shape"] = rng.choice(options)
        return _dict_set(header, key, info), f"reshape {key} {shape}->{info['shape']}"
    if op == 1 and len(entries) > 1:
        other = rng.choice(entries)
        out = dict(header)
        out[key], out[other] = header[other], header[key]
        return out, f"swap {key}<->{other}"
    if op == 2 and len(entries) > 1:
        other = rng.choice(entries)
        info["data_offsets"] = header[other].get("data_offsets")
        return _dict_set(header, key, info), f"share offsets {key}={other}"
    offsets = info.get("data_offsets")
    if op == 3 and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
        d = rng.choice([-4, -1, 1, 4, 2**32, 2**63])
        begin, stop = info["data_offsets"]
        info["data_offsets"] = rng.choice([[begin + d, stop + d], [begin, stop + d], [begin + d, stop]])
        return _dict_set(header, key, info), f"shift {key} offsets by {d}"
    out = {k: v for k, v in header.items() if k != key}
    return out, f"drop {key}"


META_POOL: list[Any] = [0, 1, 2, 99, -1, True, "1", 1.0, 10**400, Raw("1e400"), Raw("NaN"), Raw("-Infinity"),
                        "nanogpt_lora", "peft", "standard", "kohya", "", None, "0.1.0", "99.0",
                        {"transformer.wte": Raw("NaN")}, {"transformer.wte": 10**400}, {"transformer.wte": "8"},
                        {"": 8.0}, {"nope": 8.0}, {"transformer.wte": True}, {"transformer.wte": [8.0]},
                        [["lm_head.weight"]], [["lm_head.weight", "nope"]], [["x"]], [[]], [["lm_head.weight"] * 2],
                        [["transformer.wte.main_weight.weight", "lm_head.weight", "transformer.wpe.weight"]],
                        {"lm_head.weight": "lm_head.weight"}, {"nope": "transformer.wpe.weight"},
                        {"transformer.wpe.weight": "lm_head.weight"}, {"a": "b", "b": "a"},
                        {"lm_head.weight": "transformer.wpe.weight"}, {"x.weight": "transformer.wte.lora_A.weight"},
                        {"lora_alpha": Raw("NaN")}, {"lora_alpha": 10**400}, {"lora_alpha": "8"}, {"lora_alpha": True},
                        {"lora_alpha": [8]}, {"lora_alpha": Raw("1e400")}, {"lora_alpha": None}, {"n_layer": -1},
                        ["transformer.wpe.weight"] * 3, *RAW_JSON]


def _meta_edit(meta: Any, rng: random.Random) -> tuple[Any, str] | None:
    """Edits of the recorded key order: permute, repeat, drop or add keys."""
    if not isinstance(meta, dict) or not isinstance(meta.get("order"), list) or not meta["order"]:
        return None
    order = list(meta["order"])
    op = rng.randrange(4)
    if op == 0:
        rng.shuffle(order)
    elif op == 1:
        order.append(rng.choice(order))
    elif op == 2:
        order.pop(rng.randrange(len(order)))
    else:
        order.insert(rng.randrange(len(order) + 1), rng.choice(KEYS))
    return _dict_set(meta, "order", order), f"order edit {op}"


class MetadataFormat(Format):
    name = "metadata"
    about = "FileMeta.from_header (+check_keys, ordered, to_header), then the same JSON in a file via load_checkpoint"

    def __init__(self, seeds: Seeds) -> None:
        super().__init__(seeds)
        self.header, self.data = _split_safetensors(seeds.safetensors["lora"])
        self.meta = json.loads(self.header["__metadata__"][META_KEY])
        self.stored = [k for k in self.header if k != "__metadata__"]

    def case(self, mut: Mutator, work: Path) -> Case:
        r = mut.rng
        keys = self.stored + list(self.meta.get("aliases", {}))
        if r.random() < 0.8:
            new, what = mut.tree(self.meta, META_POOL, keys=keys, special=_meta_edit)
            text = dump_json(new)
        else:
            raw, what = mut.bytes(self.header["__metadata__"][META_KEY].encode())
            text = raw.decode("utf-8", "surrogateescape")
        header = dict(self.header)
        header["__metadata__"] = {"format": "pt", META_KEY: text}
        path = work / "meta.safetensors"
        path.write_bytes(_safetensors_bytes(json.dumps(header), self.data))
        stored = self.stored

        def parse() -> object:
            meta = FileMeta.from_header({"format": "pt", META_KEY: text}, stored=stored, where="<fuzz>")
            if meta is not None:
                meta.check_keys(stored + list(meta.aliases), where="<fuzz>")
                meta.ordered(stored)
                meta.to_header()
            return _load_and_detect(path)

        return Case(f"metadata: {what}", parse)


class PickleFormat(Format):
    """Torch pickles: byte edits, mutated checkpoint dicts, crafted values spliced in, exploits."""

    zip_format = True

    def __init__(self, seeds: Seeds) -> None:
        super().__init__(seeds)
        self._members: tuple[Any, list[tuple[str, bytes]]] | None = None  # the zip members of the last object saved

    def case(self, mut: Mutator, work: Path) -> Case:
        r = mut.rng
        seed_name = r.choice(list(self.seeds.pt_objects))
        obj = self.seeds.pt_objects[seed_name]
        weights = [25, 35, 15, 10, 15 if self.zip_format else 0]
        strategy = r.choices(["bytes", "object", "crafted", "exploit", "member"], weights)[0]
        if strategy == "bytes":
            raw = torch_save_bytes(obj, zip_format=self.zip_format)
            data = sum(t.numel() * t.element_size() for t in _tensors(obj))
            focus = (0, 1024) if self.zip_format else (0, len(raw) - data)  # data.pkl / the pickles before the data
            out, what = mut.bytes(raw, focus=focus, others=[raw])
        elif strategy == "object":
            for _ in range(20):
                new, what = mutate_checkpoint(mut, obj, bombs=False)
                try:
                    out = torch_save_bytes(new, zip_format=self.zip_format)
                    break
                except Exception:  # noqa: BLE001 - torch.save cannot write every mutation; make another
                    continue
            else:
                out, what = torch_save_bytes(obj, zip_format=self.zip_format), "unchanged"
        elif strategy == "crafted":
            with_ph, where = place_placeholder(mut, obj)
            ops, what = crafted_values(r)
            out = save_spliced(with_ph, ops, zip_format=self.zip_format)
            what = f"{what} at {where}"
        elif strategy == "exploit":
            what, payload = r.choice(exploit_pickles(self.seeds.canary))
            out = self.with_main_pickle(obj, payload, r)
            what = f"exploit {what}"
        else:
            out, what = self._member_edit(mut, torch_save_bytes(obj, zip_format=True))
        path = work / r.choice(["c.pt", "c.pth", "c.bin", "c.ckpt", "c.safetensors"])
        path.write_bytes(out)
        return Case(f"{seed_name}: {strategy}: {what}", lambda: _load_and_detect(path))

    def with_main_pickle(self, obj: Any, payload: bytes, rng: random.Random) -> bytes:
        """A file of this format whose (main) pickle is ``payload``; ``obj`` gives the rest of a zip's members."""
        if self.zip_format:
            if self._members is None or self._members[0] is not obj:
                self._members = (obj, zip_members(torch_save_bytes(obj, zip_format=True)))
            members = self._members[1]
            return build_zip([(n, payload if n.endswith("/data.pkl") else b) for n, b in members])
        if rng.random() < 0.3:
            return payload  # the first pickle of a legacy file (its magic number) is the exploit
        return save_spliced({"model": PLACEHOLDER}, payload.rstrip(b"."), zip_format=False)

    def _member_edit(self, mut: Mutator, raw: bytes) -> tuple[bytes, str]:
        r = mut.rng
        members = zip_members(raw)
        i = r.randrange(len(members))
        name, payload = members[i]
        op = r.randrange(5)
        if op == 0:
            new, what = mut.bytes(payload)
            members[i] = (name, new)
        elif op == 1:
            del members[i]
            what = "drop"
        elif op == 2:
            new_name = r.choice([name + "x", name.replace("archive", "other"), "../" + name,
                                 "/" + name.split("/", 1)[-1], name.rsplit("/", 1)[0] + "/data/999"])
            members[i] = (new_name, payload)
            what = f"rename to {members[i][0]}"
        elif op == 3:
            members.append((name, r.choice([b"", payload[: len(payload) // 2], payload + payload])))
            what = "duplicate"
        else:
            new_payload = r.choice([b"big", b"middle", b"", b"99\n", b"-1\n", b"3\n" * 1000, b"\xff" * 9, payload[:-1]])
            members[i] = (name, new_payload)
            what = f"content {new_payload[:12]!r}"
        return build_zip(members), f"member {name}: {what}"


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [v for _, v in nodes(obj) if isinstance(v, torch.Tensor)]


class PtZipFormat(PickleFormat):
    name = "pt_zip"
    about = "load_checkpoint on a torch zip checkpoint (weights_only=True), then detect_layout"
    zip_format = True


class LegacyPickleFormat(PickleFormat):
    name = "pickle_legacy"
    about = "load_checkpoint on a legacy torch pickle (weights_only=True), then detect_layout"
    zip_format = False


LINKS = ["link_in", "link_out", "link_passwd", "link_loop", "link_dir", "link_dangling",
         "link_parent/stolen.safetensors", "link_dir/secret.txt", "config.json", "model.safetensors.index.json",
         "missing.safetensors", "sub", "fifo"]


class IndexFormat(Format):
    name = "index_json"
    about = "load_checkpoint on a sharded folder (model.safetensors.index.json + shards + links), then detect_layout"

    def __init__(self, seeds: Seeds) -> None:
        super().__init__(seeds)
        self.index = json.loads((seeds.llama / "model.safetensors.index.json").read_text())
        self.shards = sorted(p.name for p in seeds.llama.glob("*.safetensors"))
        self.names = [*NAMES, *LINKS, f"sub/{self.shards[0]}", f"sub/../{self.shards[0]}", f"./{self.shards[0]}"]
        self.pool: list[Any] = [*self.names, {"a": "b"}, [], 5, None]

    def case(self, mut: Mutator, work: Path) -> Case:
        r = mut.rng
        snapshot = r.random() < 0.1
        folder = work / "repo" / "snapshots" / "abc123" if snapshot else work / "m"
        folder.mkdir(parents=True)
        if snapshot:  # a Hugging Face cache: shards are links into the repository's blobs folder
            blobs = work / "repo" / "blobs"
            blobs.mkdir()
            for name in self.shards:
                os.link(self.seeds.llama / name, blobs / name)
                os.symlink(Path("..", "..", "blobs", name), folder / name)
        else:
            for name in self.shards:
                os.link(self.seeds.llama / name, folder / name)
        what = []
        if r.random() < 0.1:  # a damaged shard
            name = r.choice(self.shards)
            target = folder / name
            data = target.read_bytes()
            target.unlink()
            n = int.from_bytes(data[:8], "little")
            new, w = mut.bytes(data, focus=(0, 8 + n))
            target.write_bytes(new)
            what.append(f"shard {name} {w}")
        (folder / "sub").mkdir()
        os.link(self.seeds.llama / self.shards[0], folder / "sub" / self.shards[0])
        (folder / "config.json").write_text("{}")
        os.symlink(self.shards[0], folder / "link_in")
        os.symlink(self.seeds.outside / "stolen.safetensors", folder / "link_out")
        os.symlink("/etc/passwd", folder / "link_passwd")
        os.symlink("link_loop", folder / "link_loop")
        os.symlink(self.seeds.outside, folder / "link_dir")
        os.symlink(self.seeds.outside, folder / "link_parent")
        os.symlink(work / "nowhere", folder / "link_dangling")
        if r.random() < 0.05:
            os.mkfifo(folder / "fifo")
        index_path = folder / "model.safetensors.index.json"
        choice = r.random()
        if choice < 0.2:
            new, w = self._benign_edit(self.index, folder, r)
            index_path.write_text(dump_json(new), encoding="utf-8", errors="surrogatepass")
        elif choice < 0.75:
            new, w = mut.tree(self.index, self.pool, keys=list(self.index["weight_map"]), special=self._shard_edit)
            index_path.write_text(dump_json(new), encoding="utf-8", errors="surrogatepass")
        elif choice < 0.92:
            new_bytes, w = mut.bytes(json.dumps(self.index).encode())
            index_path.write_bytes(new_bytes)
        else:
            kind = r.choice(["dir", "link-out", "link-passwd", "link-loop", "empty"])
            w = f"index is {kind}"
            if kind == "dir":
                index_path.mkdir()
            elif kind == "link-out":
                (self.seeds.outside / "index.json").write_text(json.dumps(self.index))
                os.symlink(self.seeds.outside / "index.json", index_path)
            elif kind == "link-passwd":
                os.symlink("/etc/passwd", index_path)
            elif kind == "link-loop":
                os.symlink(index_path.name, index_path)
            else:
                index_path.write_bytes(b"")
        what.append(w)
        return Case(f"{'snapshot ' if snapshot else ''}index: {'; '.join(what)}", lambda: _load_and_detect(folder))

    def _benign_edit(self, index: dict[str, Any], folder: Path, rng: random.Random) -> tuple[dict[str, Any], str]:
        """An index that is still valid: keys reordered, other metadata, a shard renamed or reached through a link
        or a subfolder inside the folder."""
        wm = dict(index["weight_map"])
        op = rng.randrange(4)
        if op == 0:
            keys = list(wm)
            rng.shuffle(keys)
            return {**index, "weight_map": {k: wm[k] for k in keys}}, "mostly valid: keys reordered"
        if op == 1:
            return {**index, "metadata": rng.choice(SCALARS), "extra": rng.choice(SCALARS)}, "mostly valid: metadata"
        shard = rng.choice(self.shards)
        if op == 2:
            new = rng.choice(["renamed.safetensors", "ü.safetensors", "a b.safetensors", "x" * 200])
            (folder / shard).rename(folder / new)
        else:
            first = shard == self.shards[0]  # the one with a link and a copy in sub/
            new = rng.choice(["link_in", f"./{shard}", f"sub/{shard}", f"sub/../{shard}"]) if first else shard
        new_map = {k: new if v == shard else v for k, v in wm.items()}
        return {**index, "weight_map": new_map}, f"mostly valid: {shard} -> {new}"

    def _shard_edit(self, index: Any, rng: random.Random) -> tuple[Any, str] | None:
        """Point one key's shard name at a hostile name (traversal, absolute, links out, …)."""
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
            return None
        wm = dict(index["weight_map"])
        key = rng.choice(list(wm))
        if rng.random() < 0.5:
            name = rng.choice(self.names)
            for k in [k for k in wm if wm[k] == wm[key]] if rng.random() < 0.5 else [key]:
                wm[k] = name
        else:
            name = rng.choice(self.shards)
            wm[key] = name
        return _dict_set(index, "weight_map", wm), f"shard of {key} -> {name!r}"


PEFT_POOL: list[Any] = ["LORA", "lora", "LOHA", "PREFIX_TUNING", None, 0, -1, 1, 2, 3, 2.0, 2.5, "2", "x", True,
                        10**400, Raw("1e400"), Raw("NaN"), Raw("Infinity"), 2**63, -(2**63),
                        {"q_proj": 4}, {"q_proj": "x"}, {"q_proj": Raw("Infinity")}, {"q_proj": Raw("NaN")},
                        {"q_proj": 10**400}, {"q_proj": None}, {"q_proj": [1]}, {"q_proj": True}, {"(": 4}, {"[": 1},
                        {"*": 1}, {"a{99999999999}": 1}, {"\\": 2}, {"": 2}, {".*": 0}, {".*": -2},
                        {"model.layers.0.self_attn.q_proj": 2}, {"(" * 500 + ")" * 500: 2},
                        {"(.*)*z": 2}, {"(a|a)*b": 1}, {"(\\w+\\.?)+z": 2}, {".*.*.*.*.*.*.*.*.*.*.*.*z": 2},
                        {"(?i)q_proj": 2}, {"(?P<idx>q)_proj": 2}, {"q_proj|": 2}, {"\\1": 2}, {"(?=": 2},
                        ["(?i)q_proj"], "(?i).*proj", "(?P<idx>layers)", [0, -1, 10**400], "layers",
                        ["q_proj"], ["experts"], [0, 1], "all-linear", {"r": 2}, *RAW_JSON]
PEFT_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type", "target_parameters",
             "use_qalora", "layer_replication", "trainable_token_indices", "fan_in_fan_out", "use_dora",
             "modules_to_save", "lora_bias", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "task_type", "alpha_pattern"]


class AdapterFormat(Format):
    name = "adapter_config"
    about = "load_peft_adapter on a PEFT folder (adapter_config.json, adapter weights)"

    def __init__(self, seeds: Seeds) -> None:
        super().__init__(seeds)
        self.config = json.loads((seeds.adapter / "adapter_config.json").read_text())
        self.weights = seeds.adapter / "adapter_model.safetensors"
        self.bin = seeds.root / "adapter_model.bin"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(load_checkpoint(self.weights).state_dict, self.bin)

    def case(self, mut: Mutator, work: Path) -> Case:
        r = mut.rng
        folder = work / "adapter"
        folder.mkdir()
        what = []
        kinds = ["safetensors", "bin", "damaged", "missing", "dir", "link-out", "link-loop"]
        weights = r.choices(kinds, [70, 8, 8, 3, 3, 5, 3])[0]
        target = folder / ("adapter_model.bin" if weights == "bin" else "adapter_model.safetensors")
        if weights == "safetensors":
            os.link(self.weights, target)
        elif weights == "bin":
            os.link(self.bin, target)
        elif weights == "damaged":
            data = self.weights.read_bytes()
            new, w = mut.bytes(data, focus=(0, 8 + int.from_bytes(data[:8], "little")))
            target.write_bytes(new)
            what.append(f"weights {w}")
        elif weights == "dir":
            target.mkdir()
        elif weights == "link-out":
            os.symlink(self.seeds.outside / "stolen.safetensors", target)
        elif weights == "link-loop":
            os.symlink(target.name, target)
        if weights not in ("safetensors", "damaged"):
            what.append(f"weights {weights}")
        config_path = folder / "adapter_config.json"
        choice = r.random()
        if choice < 0.8:
            new, w = mut.tree(self.config, PEFT_POOL, keys=PEFT_KEYS)
            config_path.write_text(dump_json(new), encoding="utf-8", errors="surrogatepass")
        elif choice < 0.95:
            new_bytes, w = mut.bytes(json.dumps(self.config).encode())
            config_path.write_bytes(new_bytes)
        else:
            kind = r.choice(["dir", "link-passwd", "link-loop"])
            w = f"config is {kind}"
            if kind == "dir":
                config_path.mkdir()
            elif kind == "link-passwd":
                os.symlink("/etc/passwd", config_path)
            else:
                os.symlink(config_path.name, config_path)
        what.append(w)
        return Case(f"adapter: {'; '.join(what)}", lambda: load_peft_adapter(folder))


class CheckpointDictFormat(Format):
    name = "ckpt_dict"
    about = "checkpoint_from_dict on Python objects (nanoGPT checkpoint dicts), then detect_layout and resolve_alpha"

    def case(self, mut: Mutator, work: Path) -> Case:
        r = mut.rng
        seed_name = r.choice(list(self.seeds.pt_objects))
        obj, what = mutate_checkpoint(mut, self.seeds.pt_objects[seed_name])
        path = Path("fuzz.pt") if r.random() < 0.7 else None

        def parse() -> object:
            ckpt = checkpoint_from_dict(obj, path)
            layout = detect_layout(ckpt.state_dict)
            ckpt.resolve_alpha(None)
            ckpt.resolve_alpha(8.0)
            return layout

        return Case(f"{seed_name}: {what}", parse)


FORMATS: dict[str, type[Format]] = {
    f.name: f for f in (SafetensorsFormat, MetadataFormat, PtZipFormat, LegacyPickleFormat, IndexFormat, AdapterFormat,
                        CheckpointDictFormat)
}


def make_case(fmt: Format, seed: int, index: int, work: Path) -> Case:
    """Case ``index`` of ``fmt`` (deterministic for a seed), its files under ``work``."""
    rng = random.Random(f"{seed}/{fmt.name}/{index}")
    return fmt.case(Mutator(rng), work)


def run_format(
    name: str,
    seeds: Seeds,
    *,
    count: int,
    seed: int = 0,
    timeout: float = 10.0,
    start: int = 0,
    save: Path | None = None,
    progress: Callable[[Result], None] | None = None,
) -> Result:
    """Run inputs ``start … start + count - 1`` of format ``name``; every file lives under ``seeds.root``."""
    fmt = FORMATS[name](seeds)
    result = Result(name)
    began = time.perf_counter()
    for index in range(start, start + count):
        work = Path(tempfile.mkdtemp(dir=seeds.root, prefix=f"{name}-"))
        try:
            try:
                case = make_case(fmt, seed, index, work)
            except Exception:  # noqa: BLE001 - a bug of the fuzzer, not of lora_ckpt: reported apart
                result.unmade.append(f"input {index}: {traceback.format_exc(limit=-4)}")
                continue
            outcome = run_case(case, result, timeout=timeout, canary=seeds.canary, index=index)
            if save is not None and outcome in ("other", "hang", "code"):
                shutil.copytree(work, save / f"{name}-{index}", symlinks=True, dirs_exist_ok=True)
                (save / f"{name}-{index}" / "CASE.txt").write_text(case.what, errors="replace")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if progress is not None and result.tried % 1000 == 0:
            progress(result)
    result.seconds = time.perf_counter() - began
    return result


def table(results: list[Result]) -> str:
    head = ("format", "inputs", "typed errors", "accepted", "other exceptions", "hangs", "code ran", "long msgs",
            "seconds")
    rows = [head] + [(r.name, str(r.tried), str(r.typed), str(r.accepted), str(r.other), str(r.hangs), str(r.code_runs),
                      str(r.long_messages), f"{r.seconds:.1f}") for r in results]
    if len(results) > 1:
        rows.append(("total", *(str(sum(getattr(r, a) for r in results)) for a in
                                ("tried", "typed", "accepted", "other", "hangs", "code_runs", "long_messages")),
                     f"{sum(r.seconds for r in results):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_failures(results: list[Result], *, shown: int = 3) -> str:
    out = []
    for r in results:
        if not r.failures:
            continue
        out.append(f"\n=== {r.name}: {len(r.failures)} distinct failure(s) ===")
        for i, (sig, items) in enumerate(r.failures.items()):
            if i >= shown:
                out.append(f"... and {len(r.failures) - shown} more: " + "; ".join(list(r.failures)[shown:]))
                break
            out.append(f"--- {sig}")
            out.extend(items[1:] if sig.startswith("code") else items[1:])
            if not sig.startswith("code"):
                out.append(items[0].rstrip())
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="inputs per format (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", action="append", choices=list(FORMATS), help="only these formats (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one parse may take (default 10)")
    parser.add_argument("--case", type=int, help="run only input CASE of the one --format, and show what happened")
    parser.add_argument("--save", type=Path, help="copy the files of failing inputs here")
    parser.add_argument("--memory-gb", type=float, default=16.0, help="address-space limit, 0 for none (default 16)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show typed error classes and sample messages")
    args = parser.parse_args(argv)
    if args.memory_gb:
        limit = int(args.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    formats = args.format or list(FORMATS)
    with tempfile.TemporaryDirectory(prefix="lora-ckpt-fuzz-") as tmp:
        seeds = prepare(Path(tmp))
        CURRENT_INPUT.append(Path(tmp) / "current-input.txt")
        print(f"(should a hang ignore every signal, faulthandler ends the run with the stacks; "
              f"{CURRENT_INPUT[0]} then names the input)", file=sys.stderr)
        if args.case is not None:
            if len(formats) != 1:
                parser.error("--case needs exactly one --format")
            work = Path(tempfile.mkdtemp(dir=seeds.root))
            case = make_case(FORMATS[formats[0]](seeds), args.seed, args.case, work)
            print(f"{formats[0]} input {args.case}: {case.what}")
            try:
                with parse_warnings(), time_limit(args.timeout):
                    print("accepted:", _short(repr(case.parse()), 500))
            except LoraCkptError as e:
                print(f"typed error {type(e).__name__}: {e}")
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                return 1
            return 0
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
        results = []
        for name in formats:
            print(f"{name}: {FORMATS[name].about}", file=sys.stderr, flush=True)
            results.append(run_format(
                name, seeds, count=args.count, seed=args.seed, timeout=args.timeout, save=args.save,
                progress=lambda r: print(f"  {r.tried} inputs, {r.failed} failed", file=sys.stderr, flush=True),
            ))
    print(f"lora_ckpt fuzz campaign: seed {args.seed}, {args.count} inputs per format, {args.timeout:g} s per parse\n")
    print(table(results))
    if args.verbose:
        for r in results:
            print(f"\n{r.name}: " + ", ".join(f"{k} {v}" for k, v in r.errors.most_common()))
            for k, v in r.samples.items():
                print(f"  {k}: {v}")
    print(report_failures(results))
    unmade = [u for r in results for u in r.unmade]
    if unmade:
        print(f"\n{len(unmade)} input(s) could not be made (a bug of the fuzzer); the first:\n{unmade[0]}")
    failed = sum(r.failed for r in results)
    print(f"\n{'FAIL' if failed else 'OK'}: {failed} input(s) raised a non-typed exception, hung or ran code")
    return 1 if failed else 2 if unmade else 0


if __name__ == "__main__":
    sys.exit(main())
