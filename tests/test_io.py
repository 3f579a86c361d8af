import os
import pickle

import pytest
import torch
from conftest import logits

import lora_ckpt.io as lio
from lora_ckpt import (
    CheckpointFileError,
    LayoutError,
    UnsafeCheckpointError,
    detect_layout,
    load_checkpoint,
    load_into,
    save_checkpoint,
)
from lora_ckpt.testing import assert_state_dict_close, make_gpt, make_lora_state_dict


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_round_trip_keeps_tensors_order_ties_and_alpha(tmp_path, suffix):
    sd = make_lora_state_dict(rank=4, wte_rank=2)
    path = save_checkpoint(tmp_path / f"c{suffix}", sd, alpha=8.0)
    ckpt = load_checkpoint(path)
    assert list(ckpt.state_dict) == list(sd)
    assert_state_dict_close(ckpt.state_dict, sd, rtol=0, atol=0)
    assert detect_layout(ckpt.state_dict).tied == detect_layout(sd).tied
    assert ckpt.alpha == {"transformer.wte": 8.0, "transformer.h.0.attn.c_attn": 8.0, "transformer.h.1.attn.c_attn": 8.0}
    assert ckpt.alpha_source == "lora_ckpt metadata"
    assert [p.name for p in tmp_path.iterdir()] == [f"c{suffix}"]  # no temporary left behind


def test_nanogpt_checkpoint_dict_alpha_and_extra(tmp_path):
    model = make_gpt(attn_rank=4, alpha=32.0, randomize=True)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": {"lora_alpha": 32, "n_layer": 2}, "iter_num": 7,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.alpha == 32.0 and ckpt.alpha_source == "model_args['lora_alpha']"
    assert sorted(ckpt.extra) == ["iter_num", "model_args", "optimizer"]
    plain = make_gpt(seed=2)
    load_into(plain, path)
    torch.testing.assert_close(logits(plain), logits(model))


def test_safetensors_keeps_model_args_but_refuses_other_entries(tmp_path):
    sd = make_lora_state_dict(rank=2)
    path = save_checkpoint(tmp_path / "a.safetensors", sd, extra={"model_args": {"n_layer": 2}})
    assert load_checkpoint(path).extra == {"model_args": {"n_layer": 2}}
    with pytest.raises(CheckpointFileError, match=r"b.safetensors: safetensors cannot hold \['optimizer'\]; write a .pt"):
        save_checkpoint(tmp_path / "b.safetensors", sd, extra={"optimizer": {}})
    assert not (tmp_path / "b.safetensors").exists()


def test_existing_target_is_not_overwritten_by_accident(tmp_path):
    sd = make_lora_state_dict(rank=2)
    path = save_checkpoint(tmp_path / "a.safetensors", sd)
    before = path.read_bytes()
    with pytest.raises(CheckpointFileError, match="a.safetensors: already exists; pass overwrite=True"):
        save_checkpoint(path, {k: v * 2 for k, v in sd.items()})
    assert path.read_bytes() == before


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_overwriting_the_input_it_was_read_from(tmp_path, suffix):
    sd = make_lora_state_dict(rank=2)
    path = save_checkpoint(tmp_path / f"a{suffix}", sd)
    loaded = load_checkpoint(path).state_dict  # .pt is memory-mapped from this very file
    doubled = {k: v * 2 for k, v in loaded.items()}
    save_checkpoint(path, {**loaded, **doubled}, overwrite=True)
    assert_state_dict_close(load_checkpoint(path).state_dict, {k: v * 2 for k, v in sd.items()}, rtol=0, atol=0)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    sd = make_lora_state_dict(rank=2)
    path = save_checkpoint(tmp_path / "a.pt", sd)
    before = path.read_bytes()

    def fail(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(lio.torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, sd, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new.pt", sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    assert path.read_bytes() == before


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_files(tmp_path, suffix):
    path = save_checkpoint(tmp_path / f"a{suffix}", make_lora_state_dict(rank=2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match=rf"a{suffix}: corrupt or truncated"):
        load_checkpoint(path)


def test_garbage_missing_and_unknown_suffix(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointFileError, match="junk.pt: not a safetensors file nor a torch checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointFileError, match="nope.pt: no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointFileError, match=r"x.npz: unknown suffix '.npz'; use .safetensors or .pt"):
        save_checkpoint(tmp_path / "x.npz", make_lora_state_dict(rank=2))
    with pytest.raises(CheckpointFileError, match="the folder .*missing does not exist"):
        save_checkpoint(tmp_path / "missing" / "x.pt", make_lora_state_dict(rank=2))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, zip_format):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if zip_format:
        torch.save({"model": {"w": torch.zeros(1)}, "x": _Exploit()}, path)
    else:
        path.write_bytes(pickle.dumps({"x": _Exploit()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="evil.pt: refusing to load, the pickle needs code"):
        load_checkpoint(path)
    assert not _Exploit.marker.exists()


def test_file_without_a_state_dict(tmp_path):
    path = tmp_path / "o.pt"
    torch.save({"iter_num": 3}, path)
    with pytest.raises(LayoutError, match=r"o.pt: no state dict found: expected tensors at the top level or under one of \['model'"):
        load_checkpoint(path)


def test_not_a_mapping_and_empty_safetensors_and_corrupt_pickle(tmp_path):
    from safetensors.torch import save_file

    from lora_ckpt.io import as_checkpoint

    with pytest.raises(LayoutError, match="expected a state dict or a checkpoint dict, got list"):
        as_checkpoint([torch.zeros(1)])  # type: ignore[arg-type]
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(LayoutError, match="empty.safetensors: the file holds no tensors"):
        load_checkpoint(empty)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u\xff")  # a pickle with a broken opcode
    with pytest.raises(CheckpointFileError, match=r"bad.pt: corrupt pickle \(Unsupported operand 255\)"):
        load_checkpoint(bad)


def test_model_args_that_json_cannot_hold(tmp_path):
    with pytest.raises(CheckpointFileError, match="cannot record lora_ckpt metadata: .*is model_args JSON-serialisable"):
        save_checkpoint(tmp_path / "a.safetensors", make_lora_state_dict(rank=2), extra={"model_args": {"x": object()}})
    assert list(tmp_path.iterdir()) == []


def test_metadata_from_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"model": make_lora_state_dict(rank=2), "lora_ckpt": {"format_version": 99, "lora_ckpt_version": "9.0"}}, path)
    with pytest.raises(CheckpointFileError, match=r"future.pt: written by lora_ckpt 9.0 in metadata format 99, which lora_ckpt 0.1.0 does not read; upgrade"):
        load_checkpoint(path)


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path):
    """A header length of 128 + 256k bytes makes the file's first byte 0x80, the first byte of a legacy pickle."""
    sd = make_gpt(seed=1).state_dict()
    for pad in range(0, 512, 8):
        path = save_checkpoint(tmp_path / f"m{pad}.safetensors", sd, extra={"model_args": {"pad": "x" * pad}})
        if path.read_bytes()[0] == 0x80:
            break
        path.unlink()
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    ckpt = load_checkpoint(path)
    assert list(ckpt.state_dict) == list(sd)
    assert ckpt.state_dict["lm_head.weight"] is ckpt.state_dict["transformer.wte.weight"]  # ties come from our metadata


def test_bin_is_hugging_faces_flat_state_dict(tmp_path, capsys):
    from lora_ckpt.cli import main
    from lora_ckpt.testing import make_gpt, make_tokens

    sd = make_gpt(seed=2).state_dict()
    save_checkpoint(tmp_path / "pytorch_model.bin", sd)
    flat = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert list(flat) == list(sd) and all(torch.equal(flat[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointFileError, match=r"x.bin: a .bin file is Hugging Face's flat state dict "
                                                  r"\(pytorch_model.bin\), with no place for the alpha, iter_num; "
                                                  r"write .pt to keep them"):
        save_checkpoint(tmp_path / "x.bin", sd, alpha=8.0, extra={"iter_num": 3})
    assert not (tmp_path / "x.bin").exists()
    lora = make_gpt(attn_rank=4, alpha=8.0, randomize=True)
    src = save_checkpoint(tmp_path / "lora.pt", lora.state_dict(), alpha=8.0,
                          extra={"model_args": {"n_layer": 2, "lora_alpha": 8.0}, "iter_num": 5})
    assert main(["merge", str(src), str(tmp_path / "merged.bin"), "--quiet"]) == 0
    assert "left out: model_args, iter_num" in capsys.readouterr().out
    plain = make_gpt(seed=9)
    plain.load_state_dict(torch.load(tmp_path / "merged.bin", weights_only=True))
    tokens = make_tokens(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), lora(tokens))
