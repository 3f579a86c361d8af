"""Streaming merges: bit-identical to in-memory merges, sharded, atomic, and bounded in memory."""

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from lora_ckpt import (
    CheckpointFileError,
    convert_layout,
    load_checkpoint,
    merge_adapter,
    merge_lora,
    save_checkpoint,
)
from lora_ckpt.cli import main
from lora_ckpt.formats.hf import load_model_weights
from lora_ckpt.formats.peft import save_peft_adapter
from lora_ckpt.streaming import StreamOptions, parse_size, stream_merge
from lora_ckpt.testing import assert_state_dict_close, make_gpt
from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_nanogpt_file_streams_bit_identical(tmp_path, suffix, dtype):
    lora = make_gpt(attn_rank=4, wte_rank=2, randomize=True)
    src = save_checkpoint(tmp_path / f"lora{suffix}", {f"_orig_mod.{k}": v for k, v in lora.state_dict().items()}, alpha=16.0)
    report = stream_merge(src, tmp_path / "out.safetensors", dtype=dtype)
    expected = merge_lora(load_checkpoint(src).state_dict, alpha=16.0, dtype=dtype)
    got = load_checkpoint(report.files[0]).state_dict
    assert list(got) == list(expected)
    assert_state_dict_close(got, expected, rtol=0, atol=0)
    assert report.merged == ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_peft_onto_sharded_base_streams_bit_identical_and_shards(llama, tmp_path, dtype):
    base, adapter = llama
    before = _digest(base) | _digest(adapter)
    report = stream_merge(base, tmp_path / "out", adapter=adapter, dtype=dtype, max_shard_size="150KB")
    assert len(report.files) > 1 and report.files[0].name == f"model-00001-of-{len(report.files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in report.files}
    config, base_config = (json.loads((f / "config.json").read_text()) for f in (tmp_path / "out", base))
    if dtype is None:
        assert (tmp_path / "out" / "config.json").read_text() == (base / "config.json").read_text()
    else:  # the config says what the weights now are
        assert config == {**base_config, "torch_dtype": "bfloat16"}
    assert_state_dict_close(load_model_weights(tmp_path / "out"), merge_adapter(base, adapter, dtype=dtype), rtol=0, atol=0)
    assert _digest(base) | _digest(adapter) == before


def test_sharded_output_loads_in_transformers_like_peft_merge(llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, adapter = llama
    stream_merge(base, tmp_path / "out", adapter=adapter, max_shard_size="100KB")
    tokens = torch.tensor([[1, 5, 9, 3, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
        expected = model.merge_and_unload().eval()(tokens).logits
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(ours(tokens).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_write_leaves_nothing_and_inputs_intact(llama, tmp_path, monkeypatch, existing):
    base, adapter = llama
    out = tmp_path / "out"
    if existing:
        stream_merge(base, out, adapter=adapter)
    before = _digest(base) | _digest(adapter) | _digest(out)
    calls = {"n": 0}
    done: set[tuple[int, int]] = set()

    def failing(fd, data, offset):
        if (fd, offset) not in done:  # one call per chunk (a chunk written in pieces counts once)
            done.add((fd, offset))
            calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.EIO, "disk went away")
        return os.pwrite(fd, data, offset)

    options = StreamOptions(chunk_bytes=16384, pwrite=failing)  # many chunk writes per shard
    with pytest.raises(OSError, match="disk went away"):
        stream_merge(base, out, adapter=adapter, max_shard_size="100KB", overwrite=True, options=options)
    assert calls["n"] == 5  # four chunks were written, the fifth failed, and nothing was written after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"] + (["out"] if existing else [])
    assert _digest(base) | _digest(adapter) | _digest(out) == before


@pytest.mark.parametrize(("block", "chunk", "dtype"), [(3000, 8192, torch.bfloat16), (6000, 8192, torch.bfloat16),
                                                    (3000, 8192, None), (40_000, 65536, None)])
def test_blocks_straddling_chunks_and_rows_too_long_for_a_chunk(llama, tmp_path, monkeypatch, block, chunk, dtype):
    """Blocks that end mid-page carry the page over to the next chunk; blocks longer than a chunk are copied in."""
    base, adapter = llama
    expected = merge_adapter(base, adapter, dtype=dtype)
    options = StreamOptions(block_bytes=block, chunk_bytes=chunk)
    report = stream_merge(base, tmp_path / "out.safetensors", adapter=adapter, dtype=dtype, options=options)
    with open(report.files[0], "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert report.files[0].stat().st_size == 8 + header + report.bytes  # the padding of the last chunk is cut off
    assert_state_dict_close(load_model_weights(report.files[0]), expected, rtol=0, atol=0)


def test_without_direct_io_and_when_the_file_system_refuses_it(llama, tmp_path, monkeypatch):
    base, adapter = llama
    expected = merge_adapter(base, adapter)
    # a platform without O_DIRECT: buffered writes
    buffered = stream_merge(base, tmp_path / "buffered.safetensors", adapter=adapter,
                            options=StreamOptions(direct_io=False)).files[0]
    assert_state_dict_close(load_model_weights(buffered), expected, rtol=0, atol=0)
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    import fcntl

    refused = []

    def refuse_direct(fd, data, offset):  # as some network and FUSE file systems do
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.pwrite(fd, data, offset)

    fallback = stream_merge(base, tmp_path / "fallback.safetensors", adapter=adapter,
                            options=StreamOptions(direct_io=True, pwrite=refuse_direct)).files[0]
    assert len(refused) == 1  # refused once, then written through the page cache
    assert fallback.read_bytes() == buffered.read_bytes()


def test_checks_fail_fast_before_any_write(llama, tmp_path, monkeypatch):
    base, adapter = llama
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointFileError, match="out: already exists; pass overwrite=True"):
        stream_merge(base, tmp_path / "out", adapter=adapter)
    with pytest.raises(CheckpointFileError, match="a sharded output is a folder; give a folder name"):
        stream_merge(base, tmp_path / "x.safetensors", adapter=adapter, max_shard_size="1MB")
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(CheckpointFileError, match=r"1.00 kB free, the output needs [0-9.]+ kB \(and 64 MB to spare\)"):
        stream_merge(base, tmp_path / "y", adapter=adapter)
    assert not (tmp_path / "y").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_without_a_gpu(llama, tmp_path):
    base, adapter = llama
    with pytest.raises(CheckpointFileError, match="device cuda was asked for, but torch sees no CUDA device"):
        stream_merge(base, tmp_path / "o", adapter=adapter, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_matches_cpu(llama, tmp_path):
    base, adapter = llama
    stream_merge(base, tmp_path / "gpu", adapter=adapter, device="cuda")
    stream_merge(base, tmp_path / "cpu", adapter=adapter)
    assert_state_dict_close(load_model_weights(tmp_path / "gpu"), load_model_weights(tmp_path / "cpu"), rtol=1e-6, atol=1e-6)


class _StandInEvent:
    made: list["_StandInEvent"] = []

    def __init__(self):
        self.recorded = self.waited = False
        _StandInEvent.made.append(self)

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        assert self.recorded
        self.waited = True


class _StandInStream:
    def wait_event(self, event):
        assert event.recorded

    def wait_stream(self, other):
        pass


@pytest.mark.parametrize("chunk", [StreamOptions().chunk_bytes, 8192])
def test_gpu_pipeline_bookkeeping_with_stand_in_streams(llama, tmp_path, monkeypatch, chunk):
    """The copy-in / merge / copy-out pipeline of ``device="cuda"`` run on the CPU with stand-in streams and
    events: every block lands in its place and every copy-out event is waited for before its bytes are
    written or moved. (The asynchrony itself needs a GPU: test_cuda_stream_matches_cpu.)"""
    base, adapter = llama
    _StandInEvent.made = []
    monkeypatch.setattr(torch.cuda, "Event", _StandInEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _StandInStream())
    options = StreamOptions(chunk_bytes=chunk, streams=(_StandInStream(), _StandInStream()))
    report = stream_merge(base, tmp_path / "out.safetensors", adapter=adapter, dtype=torch.bfloat16, options=options)
    expected = merge_adapter(base, adapter, dtype=torch.bfloat16)
    assert_state_dict_close(load_model_weights(report.files[0]), expected, rtol=0, atol=0)
    copied_out = _StandInEvent.made[2::3]  # each block makes copied_in, computed, copied_out
    assert len(_StandInEvent.made) == 3 * len(copied_out) > 0
    assert all(e.waited for e in _StandInEvent.made[0::3])  # the input buffer is reused only after its copy-in
    assert copied_out[-1].waited  # the writer (or a carried-over page) waited for the last copy-out


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 << 30 and parse_size("100KB") == 100_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read the size 'lots'"):
        parse_size("lots")


def test_cli_streams_with_shards_and_a_progress_bar(llama, tmp_path, capsys):
    base, adapter = llama
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out"), "--max-shard-size", "100KB"]) == 0
    captured = capsys.readouterr()
    assert "merging" in captured.err  # tqdm's bar
    assert "weights merged" in captured.out and "file(s)" in captured.out
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out2"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["merge", str(base), str(adapter), str(tmp_path / "o3"), "--max-shard-size", "lots"]) == 2


def test_kohya_and_dora_stream_like_memory(tmp_path):
    sd = make_gpt(attn_rank=4, randomize=True).state_dict()
    rel = convert_layout(sd, "kohya", alpha=8.0)
    save_checkpoint(tmp_path / "base.safetensors", rel.base)
    save_checkpoint(tmp_path / "k.safetensors", rel.state_dict)
    stream_merge(tmp_path / "base.safetensors", tmp_path / "o.safetensors", adapter=tmp_path / "k.safetensors")
    assert_state_dict_close(load_checkpoint(tmp_path / "o.safetensors").state_dict, merge_lora(sd, alpha=8.0), rtol=0, atol=0)
    peft_sd = convert_layout(sd, "peft", alpha=8.0)
    dora = dict(peft_sd.state_dict)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"):
        dora[f"base_model.model.{name}.lora_magnitude_vector"] = torch.rand(96) + 0.5
    save_peft_adapter(tmp_path / "dora", dora, alpha=peft_sd.alpha)
    stream_merge(tmp_path / "base.safetensors", tmp_path / "d.safetensors", adapter=tmp_path / "dora")
    assert_state_dict_close(load_checkpoint(tmp_path / "d.safetensors").state_dict,
                            merge_adapter(tmp_path / "base.safetensors", tmp_path / "dora"), rtol=0, atol=0)


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from lora_ckpt.streaming import StreamOptions, stream_merge

    def status(field):  # in bytes, from /proc/self/status
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    # small buffers (4 MiB chunks, 2 MiB blocks), so both sizes fill them and only growth with size shows
    options = StreamOptions(chunk_bytes=4 << 20, block_bytes=2 << 20)
    base, adapter, out = sys.argv[1:]
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the resident size now
    before = status("VmRSS")
    stream_merge(base, out, adapter=adapter, max_shard_size="20MB", options=options)
    print(before, status("VmHWM"))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc (Linux)")
def test_peak_memory_stays_bounded_as_the_checkpoint_grows(tmp_path):
    """The merge's peak resident memory above what the process held before it, in a fresh process, on two sizes.

    (Not ``ru_maxrss``: importing torch peaks 20-30 MB differently from run to run, more than a merge adds.)
    """

    def added(layers):
        shape = LlamaShape(hidden=512, intermediate=1376, layers=layers, vocab=2048)
        base, adapter, out = tmp_path / f"base{layers}", tmp_path / f"adapter{layers}", tmp_path / f"out{layers}"
        write_llama_checkpoint(base, shape, dtype=torch.bfloat16, shard_bytes=20_000_000)
        write_llama_adapter(adapter, shape, rank=16)
        res = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(adapter), str(out)], capture_output=True,
                             text=True, check=True)
        before, peak = map(int, res.stdout.split())
        return peak - before, shape.nbytes(torch.bfloat16)

    small, small_size = added(2)
    big, big_size = added(32)
    grown = big_size - small_size  # about 190 MB more weights
    assert big - small < 0.25 * grown, (small, big, grown)
    largest = 2048 * 512 * 2  # the embedding, in bytes
    assert big < 1.5 * largest + (16 << 20) + (30 << 20), big  # + the buffers + the factors and slack
