"""Files you can trust: every break found by a hostile user, each with the test that shows it closed.

Inputs' bytes are hashed before and after; no leftovers may remain beside an output.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_ckpt import CheckpointFileError, load_checkpoint, save_checkpoint, stream_convert, stream_merge
from lora_ckpt.cli import main
from lora_ckpt.output import Output, clean_leftovers, write_together
from lora_ckpt.source import Source
from lora_ckpt.streaming import StreamOptions
from lora_ckpt.testing import make_gpt
from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint


def _digest(*paths: Path) -> dict[str, str]:
    out = {}
    for path in paths:
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()})
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".lora-ckpt-" in p.name)


@pytest.fixture
def proj(tmp_path):
    """A project folder: a sharded Llama base, a PEFT adapter, and a file of the user's own."""
    shape = LlamaShape(hidden=32, intermediate=64, layers=2, vocab=64)
    write_llama_checkpoint(tmp_path / "proj" / "base", shape, dtype=torch.float32, shard_bytes=30_000)
    write_llama_adapter(tmp_path / "proj" / "adapter", shape, rank=4, dtype=torch.float32)
    (tmp_path / "proj" / "notes.txt").write_text("my only copy")
    return tmp_path / "proj"


# --- critical: --force never deletes an input ------------------------------------------------------


@pytest.mark.parametrize("dst", ["proj", "proj/base", "proj/adapter", "proj/base/merged", ".."])
def test_force_never_writes_over_or_around_an_input(proj, capsys, monkeypatch, dst):
    monkeypatch.chdir(proj / "base")
    base, adapter = str(proj / "base"), str(proj / "adapter")
    target = dst if dst == ".." else str(proj.parent / dst)
    before = _digest(proj)
    assert main(["merge", base, adapter, target, "--force", "--quiet"]) == 1
    err = capsys.readouterr().err
    expected = "name a new file or folder for the output, not '..'" if dst == ".." else (
        "lora-ckpt never writes over its inputs: choose an output path outside them")
    assert expected in err, err
    assert err.count("\n") == 1
    assert _digest(proj) == before
    assert not _leftovers(proj) and not _leftovers(proj.parent)


def test_force_refuses_a_folder_holding_other_files_and_names_them(proj, capsys):
    out = proj.parent / "out"
    out.mkdir()
    (out / "train.log").write_text("keep me")
    (out / "runs").mkdir()
    (out / "config.json").write_text("{}")
    assert main(["merge", str(proj / "base"), str(proj / "adapter"), str(out), "--force", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{out}: holds runs/, train.log, which a model or adapter folder does not;" in err
    assert (out / "train.log").read_text() == "keep me" and (out / "runs").is_dir()


def test_force_replaces_a_previous_model_folder_and_keeps_its_mode(proj, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(proj / "base"), str(proj / "adapter"), str(out), "--quiet"]) == 0
    first = _digest(out)
    out.chmod(0o750)
    assert main(["merge", str(proj / "base"), str(proj / "adapter"), str(out), "--force", "--quiet"]) == 0
    assert _digest(out) == first and stat.S_IMODE(out.stat().st_mode) == 0o750
    assert not _leftovers(tmp_path)


# --- high: paths read from an index stay in their folder; shards are unambiguous ------------------


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors", "link"])
def test_index_paths_outside_the_folder_are_refused(proj, tmp_path, name):
    base = proj / "base"
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    (base / first).rename(outside)
    if name == "link":
        (base / "link").symlink_to(outside)
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=r"(outside the folder; refusing to read it|is a link to .*outside)"):
        Source.open(base)
    assert main(["inspect", str(base)]) == 1


def _shard_keys(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def test_a_key_in_two_shards_and_a_key_no_shard_holds_are_errors(proj):
    base = proj / "base"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    a, b = sorted(set(index["weight_map"].values()))[:2]
    sd_a, sd_b = _shard_keys(base / a), _shard_keys(base / b)
    dup = next(iter(sd_a))
    save_file({**sd_b, dup: torch.zeros_like(sd_a[dup])}, str(base / b))
    with pytest.raises(CheckpointFileError, match=rf"{dup} is in two shards, {a} and {b}"):
        Source.open(base)
    save_file(sd_b, str(base / b))
    index["weight_map"]["model.layers.9.ghost.weight"] = a
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=r"lists \['model.layers.9.ghost.weight'\] in .*which does not hold it"):
        Source.open(base)
    del index["weight_map"][next(iter(sd_b))]
    index["weight_map"].pop("model.layers.9.ghost.weight")
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=rf"does not list {next(iter(sd_b))}, which {b} holds; fix the index"):
        Source.open(base)


# --- medium: our own metadata is input like any other ----------------------------------------------


def _with_meta(tmp_path: Path, meta: object, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path = tmp_path / "m.safetensors"
    tensors = tensors or {"transformer.wte.weight": torch.ones(4, 2), "other.weight": torch.zeros(3)}
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(tensors, str(path), metadata={"format": "pt", "lora_ckpt": text})
    return path


@pytest.mark.parametrize(("meta", "message"), [
    ({"format_version": 1, "aliases": {"other.weight": "transformer.wte.weight"}},
     "alias 'other.weight' names a tensor the file stores"),
    ({"format_version": 1, "aliases": {"lm_head.weight": "nowhere"}},
     "alias 'lm_head.weight' points at 'nowhere', which the file does not store"),
    ({"format_version": 1, "tied": [["transformer.wte.weight", "lm_head.weight"]]},
     r"tied group \['transformer.wte.weight', 'lm_head.weight'\] names \['lm_head.weight'\], which the file neither"),
    ("{not json", "lora_ckpt metadata is not valid JSON"),
    ("[1, 2]", "lora_ckpt metadata is a list, not an object"),
    ({"format_version": "1"}, "format_version '1' is not a positive integer"),
    ({"format_version": 1.5}, "format_version 1.5 is not a positive integer"),
    ({"format_version": 1, "alpha": "8"}, "alpha '8' is not a finite number"),
    ({"format_version": 1, "alpha": {"m": float("nan")}}, "alpha of 'm' is nan, not a finite number"),
    ({"format_version": 1, "tied": "x", "aliases": []}, "tied is not a list of key lists"),
    ({"format_version": 99, "lora_ckpt_version": "9.0"}, "in metadata format 99, which lora_ckpt .* does not read; upgrade"),
])
def test_metadata_is_validated_by_every_path(tmp_path, meta, message):
    path = _with_meta(tmp_path, meta)
    with pytest.raises(CheckpointFileError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointFileError, match=message):  # the streamed paths read it through the same reader
        stream_merge(path, tmp_path / "o.safetensors", alpha=1.0)
    with pytest.raises(CheckpointFileError, match=message):
        stream_convert(path, tmp_path / "c.safetensors", to="torchtune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_file_marked_with_a_newer_format_is_refused_by_stream_as_by_memory(tmp_path):
    lora = make_gpt(attn_rank=2, randomize=True)
    path = save_checkpoint(tmp_path / "l.safetensors", lora.state_dict(), alpha=4.0)
    from lora_ckpt.source import read_safetensors_header

    entries, header_meta = read_safetensors_header(path)
    meta = json.loads(header_meta["lora_ckpt"]) | {"format_version": 99}
    tensors = load_checkpoint(path).state_dict
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", "lora_ckpt": json.dumps({k: v for k, v in meta.items() if k != "aliases"})})
    for run in (lambda: load_checkpoint(path), lambda: stream_merge(path, tmp_path / "o.safetensors"),
                lambda: stream_convert(path, tmp_path / "c.safetensors", to="torchtune")):
        with pytest.raises(CheckpointFileError, match="metadata format 99, which lora_ckpt .* does not read; upgrade"):
            run()


# --- medium: outputs in pairs, stale leftovers, symlinks, folders named like files ------------------


def test_convert_to_peft_with_force_replaces_both_or_neither(tmp_path, capsys):
    lora = make_gpt(attn_rank=4, randomize=True)
    src = save_checkpoint(tmp_path / "l.pt", lora.state_dict(), alpha=8.0)
    base_out, adapter = tmp_path / "base.safetensors", tmp_path / "adapter"
    base_out.write_bytes(b"the user's old base")
    adapter.mkdir()
    (adapter / "keep.txt").write_text("not a model file")  # the adapter write will be refused ...
    before = _digest(base_out, adapter)
    assert main(["convert", str(src), str(adapter), "--to", "peft", "--base-out", str(base_out), "--force",
                 "--quiet"]) == 1
    assert "holds keep.txt, which a model or adapter folder does not" in capsys.readouterr().err
    assert _digest(base_out, adapter) == before  # ... and the base was not replaced first
    (adapter / "keep.txt").unlink()
    assert main(["convert", str(src), str(adapter), "--to", "peft", "--base-out", str(base_out), "--force",
                 "--quiet"]) == 0
    assert load_checkpoint(base_out).state_dict and (adapter / "adapter_config.json").is_file()
    assert not _leftovers(tmp_path)


def test_a_failure_installing_the_second_of_a_pair_puts_the_first_back(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b"
    a.write_bytes(b"old a")
    first, second = Output.prepare(a, overwrite=True), Output.prepare(b, folder=True)
    b.mkdir()  # appears while the pair is being written: the second install must fail
    (b / "x").write_text("someone else's")
    with pytest.raises(CheckpointFileError, match="appeared while this run was writing it"):
        with write_together(first, second) as (sa, sb):
            sa.write_bytes(b"new a")
            (sb / "model.safetensors").write_bytes(b"new b")
    assert a.read_bytes() == b"old a" and (b / "x").read_text() == "someone else's"
    assert not _leftovers(tmp_path)


def test_stale_leftovers_do_not_block_force_and_are_cleaned(tmp_path, capsys):
    lora = make_gpt(attn_rank=2, randomize=True)
    src = save_checkpoint(tmp_path / "l.safetensors", lora.state_dict(), alpha=4.0)
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(src), str(out), "--quiet"]) == 0
    (tmp_path / ".out.safetensors.old").write_bytes(b"an old name from lora-ckpt 0.1")
    dead = 2**22 + 12345  # above Linux's pid_max default: no such process
    (tmp_path / f".out.safetensors.lora-ckpt-{dead}-0123abcd.tmp").write_bytes(b"half a file")
    (tmp_path / f".out.safetensors.lora-ckpt-{os.getpid()}-0123abcd.tmp").write_bytes(b"a live run's")
    assert main(["merge", str(src), str(out), "--force", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"removed .out.safetensors.lora-ckpt-{dead}-0123abcd.tmp, left by an interrupted run (pid {dead})" in err
    assert _leftovers(tmp_path) == [f".out.safetensors.lora-ckpt-{os.getpid()}-0123abcd.tmp"]  # a live run's stays


def test_an_old_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    target = tmp_path / "out.safetensors"
    dead = 2**22 + 54321
    aside = tmp_path / f".out.safetensors.lora-ckpt-{dead}-89abcdef.old"
    aside.write_bytes(b"the previous output")
    assert clean_leftovers(target) == [f"put back {target}, moved aside by an interrupted run (pid {dead})"]
    assert target.read_bytes() == b"the previous output" and not aside.exists()


def test_symlinked_outputs_and_folders_named_like_files(proj, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    args = [str(proj / "base"), str(proj / "adapter")]
    assert main(["merge", *args, str(tmp_path / "link"), "--force", "--quiet"]) == 1
    assert f"link: is a symbolic link (to {real}); lora-ckpt replaces only plain files and folders" in capsys.readouterr().err
    assert list(real.iterdir()) == []
    (tmp_path / "d.safetensors").mkdir()
    assert main(["merge", *args, str(tmp_path / "d.safetensors"), "--quiet"]) == 1
    err = capsys.readouterr().err  # not "pass --force": the folder would not become a file by it
    assert "d.safetensors: already exists and is a folder, but this output is a file; give another name" in err
    assert main(["merge", *args, str(tmp_path / "d.safetensors"), "--force", "--quiet"]) == 1
    assert "d.safetensors: is a folder, and the output is a file; remove the folder" in capsys.readouterr().err
    assert not _leftovers(tmp_path)


def test_two_writers_of_one_new_output_exactly_one_wins(tmp_path):
    target = tmp_path / "out.safetensors"
    first, second = Output.prepare(target), Output.prepare(target)  # both checked before either wrote
    with first.writing() as staged:
        staged.write_bytes(b"first")
    with pytest.raises(CheckpointFileError, match="appeared while this run was writing it .*; nothing replaced"):
        with second.writing() as staged:
            staged.write_bytes(b"second")
    assert target.read_bytes() == b"first" and not _leftovers(tmp_path)


def test_outputs_follow_the_umask(proj, tmp_path):
    old = os.umask(0o027)
    try:
        lora = make_gpt(attn_rank=2, randomize=True)
        path = save_checkpoint(tmp_path / "l.safetensors", lora.state_dict(), alpha=4.0)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        report = stream_merge(proj / "base", tmp_path / "merged", adapter=proj / "adapter")
        assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o750
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o640 for f in report.files)
        path.chmod(0o644)
        save_checkpoint(path, lora.state_dict(), alpha=4.0, overwrite=True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # a replaced file keeps its mode
    finally:
        os.umask(old)


# --- medium: one clear line, never a traceback ----------------------------------------------------


def _safetensors_with_header(path: Path, header: bytes, *, length: int | None = None) -> Path:
    path.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: _safetensors_with_header(p, b'{"a":{}}', length=2**63 + 5), "corrupt or truncated safetensors file"),
    (lambda p: _safetensors_with_header(p, b"[1, 2, 3]"), "not a safetensors file nor a torch checkpoint"),
    (lambda p: _safetensors_with_header(p, b'{"a": 7}   '), r"corrupt safetensors header \(a: not an object\)"),
    (lambda p: _safetensors_with_header(p, b'{"a":{"dtype":"F32","shape":[1]}}'),
     r"a: data_offsets None is not two non-negative integers"),
    (lambda p: p.write_bytes(b"\x80") and p, "corrupt or truncated torch checkpoint|corrupt pickle"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip") and p, "corrupt or truncated torch checkpoint"),
])
def test_corrupt_files_give_one_line(tmp_path, capsys, make, message):
    path = make(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointFileError, match=message):
        load_checkpoint(path)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lora-ckpt: error: {path}: ") and err.count("\n") == 1


def test_a_pickle_named_safetensors_and_a_damaged_zip(tmp_path):
    sd = make_gpt(attn_rank=2).state_dict()
    pt = save_checkpoint(tmp_path / "a.pt", sd, alpha=4.0)
    named = tmp_path / "b.safetensors"
    named.write_bytes(pt.read_bytes())
    assert set(load_checkpoint(named).state_dict) == set(sd)  # read by its content, not its name
    damaged = tmp_path / "c.pt"
    with zipfile.ZipFile(pt) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith("/data/0"):  # a storage the pickle refers to goes missing
                zout.writestr(item, zin.read(item.filename))
    with pytest.raises(CheckpointFileError, match=r"c.pt: corrupt or truncated torch checkpoint"):
        load_checkpoint(damaged)


@pytest.mark.parametrize(("text", "message"), [
    (b"\xff\xfe not utf-8", "is not valid UTF-8 JSON"),
    (b"[1, 2]", "is a JSON list, not an object"),
    (b'{"weight_map": [1]}', "not a valid index"),
    (b'{"weight_map": {"a": "x.safetensors"}, "weight_map": {}}', "the key 'weight_map' appears twice"),
])
def test_bad_index_and_config_json(proj, text, message):
    (proj / "base" / "model.safetensors.index.json").write_bytes(text)
    with pytest.raises(CheckpointFileError, match=message):
        Source.open(proj / "base")
    (proj / "adapter" / "adapter_config.json").write_bytes(text)
    if "weight_map" not in text.decode("utf-8", "replace"):
        with pytest.raises(CheckpointFileError, match=message):
            Source.open(proj / "adapter")


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:x"])
def test_a_bad_device_is_a_usage_error(proj, tmp_path, capsys, device):
    assert main(["merge", str(proj / "base"), str(proj / "adapter"), str(tmp_path / "o"), "--device", device]) == 2
    assert "is not a device lora-ckpt merges on; use cpu or cuda[:N]" in capsys.readouterr().err


def test_os_errors_mid_write_give_one_line_and_leave_nothing(proj, tmp_path):
    import errno

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        stream_merge(proj / "base", tmp_path / "o", adapter=proj / "adapter", options=StreamOptions(pwrite=full))
    assert info.value.errno == errno.ENOSPC and ".lora-ckpt-" in info.value.filename  # the file is named
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize(("code", "text"), [
    (28, "no space left on the device; free some space or write elsewhere"),
    (30, "read-only file system; write elsewhere"),
    (13, "permission denied; check the permissions or write elsewhere"),
    (27, "file too large for this file system; write a sharded folder (--max-shard-size) or elsewhere"),
])
def test_the_cli_names_the_file_and_the_way_out_for_os_errors(proj, tmp_path, capsys, monkeypatch, code, text):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "o" / "model.safetensors"))

    monkeypatch.setattr("lora_ckpt.files.merge_files", fail)
    assert main(["merge", str(proj / "base"), str(proj / "adapter"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err == f"lora-ckpt: error: {tmp_path / 'o' / 'model.safetensors'}: {text} (nothing was written; the inputs are unchanged)\n"


def test_dev_full_is_not_an_output(proj, capsys):
    assert main(["merge", str(proj / "base"), str(proj / "adapter"), "/dev/full", "--force"]) == 1
    assert "/dev/full: exists and is not a folder" in capsys.readouterr().err


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from lora_ckpt.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, **kwargs)


def test_a_closed_pipe_is_not_a_traceback(proj):
    res = subprocess.run(f"{sys.executable} -c 'import sys; from lora_ckpt.cli import main; sys.exit(main())' "
                         f"inspect {proj / 'adapter'} | head -c 10", shell=True, capture_output=True, text=True)
    assert "Traceback" not in res.stderr and len(res.stdout) == 10


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_signals_clean_up_and_exit_without_a_traceback(proj, tmp_path, sig, code):
    """The first chunk write signals the process itself: the merge stops there, cleans up, and says so in one line."""
    script = f"""
import os, signal, sys
real = os.pwrite
def pwrite(fd, data, offset):
    os.kill(os.getpid(), signal.{sig})
    return real(fd, data, offset)
os.pwrite = pwrite  # before lora_ckpt binds it as the default writer
from lora_ckpt.cli import main
sys.exit(main(sys.argv[1:]))
"""
    before = _digest(proj)
    res = subprocess.run([sys.executable, "-c", script, "merge", str(proj / "base"), str(proj / "adapter"),
                          str(tmp_path / "o"), "--quiet"], capture_output=True, text=True)
    assert res.returncode == code, res.stderr
    assert res.stderr == "lora-ckpt: interrupted; what was not finished was removed, and the inputs are unchanged\n"
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path) and _digest(proj) == before


# --- structure: one owner per rule --------------------------------------------------------------


def test_no_private_name_crosses_a_module_boundary():
    import ast

    src = Path(__file__).parents[1] / "src" / "lora_ckpt"
    crossing = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_ckpt"):
                crossing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and a.name != "__version__"]
    assert crossing == []


# --- found by the hostile review --------------------------------------------------------------------


def _cache_like(proj: Path, root: Path) -> Path:
    """A Hugging Face cache layout: snapshots/<rev>/ files are links into ../../blobs."""
    (root / "snapshots" / "r").mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in (proj / "base").iterdir():
        (root / "blobs" / f.name).write_bytes(f.read_bytes())
        (root / "snapshots" / "r" / f.name).symlink_to(Path("../../blobs") / f.name)
    return root / "snapshots" / "r"


@pytest.mark.parametrize("dst", ["blobs", "blobs/model-00001-of-00004.safetensors"])
def test_the_files_an_input_resolves_to_are_inputs_too(proj, tmp_path, capsys, dst):
    snapshot = _cache_like(proj, tmp_path / "cache")
    assert Source.open(snapshot).files  # the cache layout is accepted as an input
    before = _digest(tmp_path / "cache")
    assert main(["merge", str(snapshot), str(proj / "adapter"), str(tmp_path / "cache" / dst), "--force", "--quiet"]) == 1
    assert "lora-ckpt never writes over its inputs" in capsys.readouterr().err
    assert _digest(tmp_path / "cache") == before


def test_leftover_cleanup_never_touches_an_input(tmp_path, capsys):
    lora = make_gpt(attn_rank=2, randomize=True)
    src = save_checkpoint(tmp_path / "l.pt", lora.state_dict(), alpha=4.0)
    named = tmp_path / ".m.safetensors.lora-ckpt-4194999-deadbeef.tmp"  # an input that looks like a leftover
    named.write_bytes(src.read_bytes())
    before = named.read_bytes()
    assert main(["merge", str(named), str(tmp_path / "m.safetensors"), "--quiet"]) == 0
    assert named.read_bytes() == before and "removed" not in capsys.readouterr().err


def test_an_old_output_beside_an_existing_one_is_reported_not_deleted(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"current")
    aside = tmp_path / ".out.safetensors.lora-ckpt-4194998-89abcdef.old"
    aside.write_bytes(b"older")
    assert "is an older output an interrupted run (pid 4194998) moved aside; remove it if you do not need it" in \
        clean_leftovers(target)[0]
    assert aside.read_bytes() == b"older"


def test_a_staging_folder_locked_by_a_run_elsewhere_is_left_alone(tmp_path):
    """A run in another PID namespace (a container on a shared volume) has a pid we cannot see: its lock says it lives."""
    import fcntl

    target = tmp_path / "o"
    staging = tmp_path / ".o.lora-ckpt-4194997-0123abcd.tmp"
    staging.mkdir()
    fd = os.open(staging, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert clean_leftovers(target) == [] and staging.is_dir()
    finally:
        os.close(fd)
    assert clean_leftovers(target) == [f"removed {staging.name}, left by an interrupted run (pid 4194997)"]


@pytest.mark.parametrize("key", ["__metadata__", ""])
def test_keys_a_safetensors_header_cannot_hold_are_refused(tmp_path, key):
    lora = make_gpt(attn_rank=2, randomize=True).state_dict()
    torch.save({"model": {**lora, key: torch.zeros(3)}}, tmp_path / "p.pt")
    with pytest.raises(CheckpointFileError, match=rf"a safetensors file cannot hold a tensor named {key!r}"):
        stream_merge(tmp_path / "p.pt", tmp_path / "o.safetensors", alpha=4.0)
    with pytest.raises(CheckpointFileError, match="a safetensors file cannot hold a tensor named"):
        save_checkpoint(tmp_path / "s.safetensors", {**lora, key: torch.zeros(3)})
    path = _with_meta(tmp_path, {"format_version": 1, "aliases": {key: "other.weight"}})
    with pytest.raises(CheckpointFileError, match=rf"alias {key!r} is not a key a state dict can hold"):
        load_checkpoint(path)
    assert not _leftovers(tmp_path)


def test_a_full_disk_under_torch_save_is_one_line(tmp_path, monkeypatch, capsys):
    lora = make_gpt(attn_rank=2, randomize=True)
    src = save_checkpoint(tmp_path / "l.safetensors", lora.state_dict(), alpha=4.0)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    assert main(["merge", str(src), str(tmp_path / "o.pt"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot write ([enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0); is the disk full?" in err
    assert err.count("\n") == 1 and not _leftovers(tmp_path) and not (tmp_path / "o.pt").exists()


def test_force_replaces_only_regular_files(proj, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "model.safetensors")
    assert main(["merge", str(proj / "base"), str(proj / "adapter"), str(out), "--force", "--quiet"]) == 1
    assert "holds model.safetensors (not a regular file)" in capsys.readouterr().err
    assert stat.S_ISFIFO((out / "model.safetensors").lstat().st_mode)


def test_broken_factors_and_a_model_folder_with_a_stray_adapter_config(proj, tmp_path):
    from lora_ckpt import merge_lora

    lora = make_gpt(attn_rank=2, randomize=True).state_dict()
    key = "transformer.h.0.attn.c_attn.lora_A.weight"
    lora[key] = lora[key].clone()
    lora[key][0, 0] = float("nan")
    with pytest.raises(Exception, match=rf"{key} holds NaN or infinite values; the adapter is broken"):
        merge_lora(lora, alpha=4.0)
    (proj / "base" / "adapter_config.json").write_text("{}")
    assert Source.open(proj / "base").kind == "folder"  # no adapter weights: the model folder it is
    (proj / "base" / "adapter_model.safetensors").write_bytes((proj / "adapter" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointFileError, match="holds both a PEFT adapter .* and model weights"):
        Source.open(proj / "base")


def test_output_names_that_mislead(proj, tmp_path, capsys):
    lora = make_gpt(attn_rank=2, randomize=True)
    src = save_checkpoint(tmp_path / "l.pt", lora.state_dict(), alpha=4.0)
    assert main(["merge", str(src), str(tmp_path / "x.safetensors") + "/", "--quiet"]) == 1
    assert "names a folder (a trailing /) but the output is a file" in capsys.readouterr().err
    assert main(["merge", str(src), str(tmp_path / "Y.SAFETENSORS"), "--quiet"]) == 0
    assert (tmp_path / "Y.SAFETENSORS").is_file()
    target = tmp_path / "s.safetensors"
    target.write_bytes(b"old")
    target.chmod(0o4755)
    assert main(["merge", str(src), str(target), "--force", "--quiet"]) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # the mode kept, never a setuid bit


def test_base_out_that_would_not_be_written_is_refused(proj, tmp_path, capsys):
    assert main(["convert", str(proj / "adapter"), str(tmp_path / "a2"), "--to", "peft", "--base", str(proj / "base"),
                 "--base-out", str(tmp_path / "b2"), "--quiet"]) == 1
    assert "nothing to write there (the base weights stay in" in capsys.readouterr().err
    assert not (tmp_path / "a2").exists() and not (tmp_path / "b2").exists()


def test_a_signal_during_torch_import_is_not_lost(tmp_path):
    """SIGTERM while the command imports torch (found by the kill trials: torch swallowed it and the merge ran)."""
    src = save_checkpoint(tmp_path / "l.pt", make_gpt(attn_rank=2, randomize=True).state_dict(), alpha=4.0)
    script = """
import builtins, os, signal, sys
real, fired = builtins.__import__, []
def hook(name, *args, **kwargs):
    if name == "numpy" and not fired:  # deep inside torch's import
        fired.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    return real(name, *args, **kwargs)
builtins.__import__ = hook
from lora_ckpt.cli import main
sys.exit(main(sys.argv[1:]))
"""
    res = subprocess.run([sys.executable, "-c", script, "merge", str(src), str(tmp_path / "o.safetensors"), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 143, res.stderr
    assert res.stderr == "lora-ckpt: interrupted; what was not finished was removed, and the inputs are unchanged\n"
    assert not (tmp_path / "o.safetensors").exists() and not _leftovers(tmp_path)


def test_a_signal_after_the_output_is_in_place_exits_0_and_says_so(tmp_path):
    src = save_checkpoint(tmp_path / "l.pt", make_gpt(attn_rank=2, randomize=True).state_dict(), alpha=4.0)
    script = """
import os, signal, sys
from lora_ckpt.cli import main
from lora_ckpt.streaming.writer import ShardedWriter
write = ShardedWriter.write
def then_signal(self, *args, **kwargs):
    report = write(self, *args, **kwargs)  # the output is installed when this returns
    os.kill(os.getpid(), signal.SIGTERM)
    return report
ShardedWriter.write = then_signal
sys.exit(main(sys.argv[1:]))
"""
    out = tmp_path / "o.safetensors"
    res = subprocess.run([sys.executable, "-c", script, "merge", str(src), str(out), "--quiet"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr == f"lora-ckpt: interrupted after writing {out}, which is complete\n"
    assert load_checkpoint(out).state_dict and not _leftovers(tmp_path)
