"""Module kinds recorded in the files lora_ckpt writes, and kinds that contradict a fact refused.

loralib, minLoRA and nanoGPT's fork name a linear module's factors and an embedding's alike; where the factors are
square (a Llama q_proj) only a record can tell. lora_ckpt's own files carry that record (``FileMeta.kinds``), so they
merge back without ``--kinds``, and a ``--kinds`` that contradicts the record, the keys or the shapes is refused.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from lora_ckpt import (
    CheckpointFileError,
    LayoutError,
    convert_files,
    detect_layout,
    load_checkpoint,
    merge_adapter,
    merge_files,
    merge_lora,
    save_checkpoint,
    stream_convert,
    stream_merge,
)
from lora_ckpt.cli import main
from lora_ckpt.filemeta import FileMeta
from lora_ckpt.testing import assert_state_dict_close

SQUARE = [f"model.layers.{n}.self_attn.{p}" for n in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
MLP = [f"model.layers.{n}.mlp.{p}" for n in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def loralib(llama, tmp_path):
    """The llama fixture's PEFT adapter converted to loralib by the CLI (q/k/v/o square at hidden 64), and the
    PEFT merge to compare with."""
    base, adapter = llama
    out = tmp_path / "loralib.safetensors"
    assert main(["convert", str(adapter), str(out), "--to", "loralib", "--base", str(base)]) == 0
    return out, merge_adapter(base, adapter)


def _square_loralib() -> dict[str, torch.Tensor]:
    """loralib: ``x`` with square factors (fit both kinds), ``y`` a linear module its shapes decide (6, 8)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"x.weight": (8, 8), "x.lora_A": (2, 8), "x.lora_B": (8, 2),
              "y.weight": (6, 8), "y.lora_A": (2, 8), "y.lora_B": (6, 2)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _with_meta(path, tensors, meta):
    """A safetensors file holding ``tensors`` and ``meta`` as lora_ckpt's metadata (edited by hand: hostile)."""
    save_file(tensors, str(path), metadata={"format": "pt", "lora_ckpt": json.dumps(meta)})
    return path


# --- round trips: written with the record, read back without --kinds ----------------------------------------


def test_cli_convert_records_kinds_and_merges_back_without_kinds(llama, loralib, tmp_path, capsys):
    """PEFT adapter -> loralib (CLI) -> merge with no --kinds: PEFT's own forward pass, and merge_adapter's weights."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, adapter = llama
    path, expected = loralib
    ckpt = load_checkpoint(path)
    assert ckpt.metadata["layout"] == "loralib"
    assert ckpt.kinds == {name: "linear" for name in SQUARE + MLP}
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(path), str(merged), "--quiet"]) == 0
    got = load_checkpoint(merged).state_dict
    assert_state_dict_close(got, expected, rtol=1e-6, atol=1e-6)

    cfg = transformers.LlamaConfig(**json.loads((base / "config.json").read_text()))
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peers' own deprecation notices
        reference = transformers.LlamaForCausalLM(cfg).eval()
        reference.load_state_dict(load_checkpoint(base).state_dict, strict=True)
        with_adapter = peft.PeftModel.from_pretrained(reference, str(adapter)).eval()
    plain = transformers.LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(got, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, with_adapter(tokens).logits, rtol=1e-5, atol=1e-5)


def test_python_api_round_trips_record_kinds(llama, tmp_path):
    """convert_files (in memory, .safetensors and .pt), stream_convert and save_checkpoint record the kinds; every
    merge route reads them back with no kinds= and computes merge_adapter's weights."""
    base, adapter = llama
    expected = merge_adapter(base, adapter)
    for name in ("a.safetensors", "a.pt"):
        convert_files(adapter, tmp_path / name, to="loralib", base=base)
        ckpt = load_checkpoint(tmp_path / name)
        assert ckpt.kinds == {m: "linear" for m in SQUARE + MLP}, name
        assert_state_dict_close(merge_lora(ckpt.state_dict, alpha=ckpt.alpha, layout=ckpt.detect()), expected,
                                rtol=1e-6, atol=1e-6)
        merge_files(tmp_path / name, tmp_path / f"m{name}.safetensors")  # streamed
        assert_state_dict_close(load_checkpoint(tmp_path / f"m{name}.safetensors").state_dict, expected,
                                rtol=1e-6, atol=1e-6)
    # loralib (square modules, recorded) -> minlora, streamed: the record goes with the modules
    report = stream_convert(tmp_path / "a.safetensors", tmp_path / "min.safetensors", to="minlora")
    mini = load_checkpoint(report.files[0])
    assert mini.metadata["layout"] == "minlora" and mini.kinds == {m: "linear" for m in SQUARE + MLP}
    stream_merge(report.files[0], tmp_path / "m_min.safetensors")
    assert_state_dict_close(load_checkpoint(tmp_path / "m_min.safetensors").state_dict, expected, rtol=1e-6, atol=1e-6)


def test_save_checkpoint_records_a_square_embedding(tmp_path):
    """A square loralib embedding (golden: W + (alpha/r)·(B@A).T) is recorded from kinds= and merges as one later."""
    sd = _square_loralib()
    with pytest.raises(LayoutError, match=r"x: shapes .* fit both a linear module and an embedding"):
        detect_layout(sd)
    for suffix in (".safetensors", ".pt"):
        path = save_checkpoint(tmp_path / f"e{suffix}", sd, alpha=4.0, kinds={"x": "embedding"})
        ckpt = load_checkpoint(path)
        assert ckpt.kinds == {"x": "embedding", "y": "linear"} and ckpt.metadata["kinds"] == ckpt.kinds
        merged = merge_lora(ckpt.state_dict, alpha=ckpt.alpha, layout=ckpt.detect())
        # scale = alpha / rank = 4 / 2 = 2; loralib's embedding formula is ΔW = (B @ A).T
        torch.testing.assert_close(merged["x.weight"], sd["x.weight"] + 2.0 * (sd["x.lora_B"] @ sd["x.lora_A"]).T)
        torch.testing.assert_close(merged["y.weight"], sd["y.weight"] + 2.0 * (sd["y.lora_B"] @ sd["y.lora_A"]))
    # without kinds= nothing is recorded, as before
    plain = load_checkpoint(save_checkpoint(tmp_path / "plain.safetensors", sd, alpha=4.0))
    assert plain.kinds == {} and plain.metadata["layout"] is None and "kinds" not in plain.metadata


def test_a_template_that_records_its_kinds_needs_none(llama, loralib, tmp_path):
    """convert --like a loralib template with square modules: the template's record settles its layout."""
    base, adapter = llama
    path, _ = loralib
    merged = merge_adapter(base, adapter)
    save_checkpoint(tmp_path / "std.safetensors", merged)
    save_checkpoint(tmp_path / "std.pt", merged)
    for src in ("std.safetensors", "std.pt"):  # streamed, in memory
        out = tmp_path / f"like_{src}.safetensors"
        assert convert_files(tmp_path / src, out, to="loralib", like=path).outputs == [out]
        assert load_checkpoint(out).kinds == load_checkpoint(path).kinds


# --- a --kinds that contradicts the record ---------------------------------------------------------------------


def test_cli_refuses_kinds_that_contradict_the_record(loralib, tmp_path, capsys):
    path, expected = loralib
    out = tmp_path / "x.safetensors"
    assert main(["merge", str(path), str(out), "--quiet", "--kinds", "embedding"]) == 1
    err = capsys.readouterr().err
    assert (f"kinds: 12 module(s) (model.layers.0.self_attn.k_proj, model.layers.0.self_attn.o_proj, "
            f"model.layers.0.self_attn.q_proj, …) whose shapes fit both kinds are recorded as linear in {path}; "
            "drop --kinds embedding to use the recorded kinds") in err
    assert "kinds={" not in err
    assert main(["merge", str(path), str(out), "--quiet", "--kinds", f"{Q0}=embedding"]) == 1
    assert (f"kinds: {Q0} is recorded as linear in {path}; drop --kinds {Q0}=embedding to use the recorded kinds"
            in capsys.readouterr().err)
    for argv in (["inspect", str(path)], ["convert", str(path), str(out), "--to", "minlora", "--quiet"],
                 ["merge", str(path), str(tmp_path / "x.pt"), "--quiet"]):
        assert main([*argv, "--kinds", "embedding"]) == 1, argv
        assert "are recorded as linear in" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.pt").exists()


def test_cli_accepts_kinds_that_agree_with_the_record(loralib, tmp_path, capsys):
    path, expected = loralib
    for i, kinds in enumerate((["--kinds", "linear"], ["--kinds", f"{Q0}=linear"],
                               ["--kinds", "linear", "--kinds", f"{Q0}=linear"])):
        out = tmp_path / f"m{i}.safetensors"
        assert main(["merge", str(path), str(out), "--quiet", *kinds]) == 0, kinds
        assert_state_dict_close(load_checkpoint(out).state_dict, expected, rtol=1e-6, atol=1e-6)
    assert main(["inspect", str(path), "--kinds", "linear"]) == 0
    assert "layout: loralib" in capsys.readouterr().out


def test_python_refusals_name_the_argument(loralib, tmp_path):
    path, _ = loralib
    with pytest.raises(LayoutError, match=r"^kinds: 12 module\(s\) .* are recorded as linear in .*; drop "
                                          r"kinds=\{'\*':'embedding'\} \(CLI: --kinds embedding\) to use the recorded"):
        merge_files(path, tmp_path / "x.safetensors", kinds={"*": "embedding"})
    with pytest.raises(LayoutError, match=rf"^kinds: {Q0} is recorded as linear in .*; drop "
                                          rf"kinds=\{{'{Q0}':'embedding'\}} \(CLI: --kinds {Q0}=embedding\) to use the "
                                          r"recorded kinds$"):
        load_checkpoint(path).detect(kinds={Q0: "embedding"})
    with pytest.raises(LayoutError, match=r"to use the recorded kinds"):
        stream_convert(path, tmp_path / "x.safetensors", to="minlora", kinds={"*": "embedding"})
    assert not (tmp_path / "x.safetensors").exists()


def test_a_star_applies_only_where_the_shapes_fit_both(tmp_path):
    """``'*'`` contradicts only the recorded kind of a module whose shapes fit both; a decided module ignores it."""
    sd = _square_loralib()
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "a.safetensors", sd, alpha=4.0, kinds={"x": "linear"}))
    assert ckpt.kinds == {"x": "linear", "y": "linear"}
    assert ckpt.detect(kinds={"*": "linear"}).kinds == ckpt.kinds
    with pytest.raises(LayoutError, match=r"^kinds: 1 module\(s\) \(x\) whose shapes fit both kinds are recorded as "
                                          r"linear in .*a.safetensors; drop kinds=\{'\*':'embedding'\}"):
        ckpt.detect(kinds={"*": "embedding"})
    # y alone is decided by its shapes: recorded linear, and '*' (embedding) has nothing to settle there
    only_y = {k: v for k, v in sd.items() if k.startswith("y.")}
    rec = load_checkpoint(save_checkpoint(tmp_path / "y.safetensors", only_y, alpha=4.0))
    assert rec.kinds == {"y": "linear"} and rec.detect(kinds={"*": "embedding"}).kinds == {"y": "linear"}
    # a named kind for a module the file does not record is the caller's, as before
    assert ckpt.resolve_kinds({"*": "linear"}) == {"x": "linear", "y": "linear", "*": "linear"}


# --- older files: nothing recorded, --kinds still needed ---------------------------------------------------------


def test_a_file_without_the_record_still_needs_kinds(loralib, tmp_path, capsys):
    path, expected = loralib
    ckpt = load_checkpoint(path)
    old_meta = {"format_version": 1, "lora_ckpt_version": "0.9.0", "layout": None, "alpha": ckpt.alpha, "tied": []}
    old = _with_meta(tmp_path / "old.safetensors", ckpt.state_dict, old_meta)
    assert FileMeta.from_dict(old_meta, stored=ckpt.state_dict, where="x").kinds == {}
    assert load_checkpoint(old).kinds == {}
    assert main(["merge", str(old), str(tmp_path / "m.safetensors"), "--quiet"]) == 1
    assert ("12 modules (model.layers.0.self_attn.k_proj, model.layers.0.self_attn.o_proj, "
            "model.layers.0.self_attn.q_proj, …) have square factors that fit both a linear module and an embedding; "
            "say which: --kinds linear or --kinds embedding for all of them" in capsys.readouterr().err)
    assert main(["merge", str(old), str(tmp_path / "m.safetensors"), "--quiet", "--kinds", "linear"]) == 0
    assert_state_dict_close(load_checkpoint(tmp_path / "m.safetensors").state_dict, expected, rtol=1e-6, atol=1e-6)


# --- hostile metadata ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds, layout, message", [
    (["x"], "loralib", r"kinds \['x'\] is not an object of module -> kind"),
    ({"x": "conv"}, "loralib", r"kinds gives 'x' the kind 'conv', not linear or embedding"),
    ({"x": 1}, "loralib", r"kinds gives 'x' the kind 1, not linear or embedding"),
    ({"x": None}, "loralib", r"kinds gives 'x' the kind None, not linear or embedding"),
    ({"x": "linear"}, None, r"kinds are recorded for layout None, whose keys are not a LoRA layout's"),
    ({"x": "linear"}, "torchtune", r"kinds are recorded for layout 'torchtune', whose keys tell linear modules and "
                                   r"embeddings apart"),
    ({"nope": "linear"}, "loralib", r"kinds names 'nope', which is not a LoRA module of the file"),
    ({"x.weight": "linear"}, "loralib", r"kinds names 'x.weight', which is not a LoRA module of the file"),
    ({"y": "embedding"}, "loralib", r"kinds records 'y' as embedding, which its shapes \(weight \(6, 8\), a \(2, 8\), "
                                    r"b \(6, 2\)\) do not fit"),
])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_hostile_kinds_are_refused_naming_file_and_field(tmp_path, kinds, layout, message, suffix):
    sd = _square_loralib()
    meta = {"format_version": 1, "lora_ckpt_version": "1.0", "layout": layout, "tied": [], "kinds": kinds}
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pt":
        torch.save({"model": sd, "lora_ckpt": meta}, path)
    else:
        _with_meta(path, sd, meta)
    pattern = rf"^{path}: lora_ckpt metadata .*{message}.*; the file is corrupt or was edited$"
    with pytest.raises(CheckpointFileError, match=pattern):
        load_checkpoint(path)
    assert main(["merge", str(path), str(tmp_path / "m.safetensors"), "--kinds", "linear", "--quiet"]) == 1


def test_recorded_kinds_of_a_sharded_folder_name_modules_in_any_shard(tmp_path):
    """Each shard carries the metadata; its kinds are checked against every shard's keys, not the one it sits in."""
    sd = _square_loralib()
    meta = {"format_version": 1, "layout": "loralib", "tied": [], "alpha": 4.0,
            "kinds": {"x": "embedding", "y": "linear"}}
    folder = tmp_path / "sharded"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": [k for k in sd if k.startswith("x.")],
              "model-00002-of-00002.safetensors": [k for k in sd if k.startswith("y.")]}
    for name, keys in shards.items():
        _with_meta(folder / name, {k: sd[k] for k in keys}, meta)
    index = {"weight_map": {k: name for name, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = load_checkpoint(folder)
    assert ckpt.kinds == {"x": "embedding", "y": "linear"}
    assert ckpt.detect().module("x").kind == "embedding"


# --- detect_layout: a kind the keys or shapes decide ---------------------------------------------------------------


def test_detect_layout_refuses_a_kind_the_keys_or_shapes_decide():
    sd = _square_loralib()
    with pytest.raises(LayoutError, match=r"^y: kinds=\{'y':'embedding'\} \(CLI: --kinds y=embedding\) says "
                                          r"embedding, but its shapes \(A \(2, 8\), B \(6, 2\), weight \(6, 8\)\) fit "
                                          r"only a linear module; drop that entry \(kinds settle only modules whose "
                                          r"shapes fit both\)$"):
        detect_layout(sd, kinds={"x": "linear", "y": "embedding"})
    assert detect_layout(sd, kinds={"x": "linear", "y": "linear"}).kinds == {"x": "linear", "y": "linear"}
    assert detect_layout(sd, kinds={"*": "embedding"}).kinds == {"x": "embedding", "y": "linear"}  # '*': both fit only
    peft = {"base_model.model.emb.lora_embedding_A": torch.zeros(2, 10),
            "base_model.model.emb.lora_embedding_B": torch.zeros(4, 2),
            "base_model.model.q.lora_A.weight": torch.zeros(2, 4),
            "base_model.model.q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(LayoutError, match=r"emb: kinds=\{'emb':'linear'\} \(CLI: --kinds emb=linear\) says linear, but "
                                          r"its keys \(lora_embedding_A\) make it an embedding; drop that entry"):
        detect_layout(peft, kinds={"emb": "linear"})
    with pytest.raises(LayoutError, match=r"q: kinds=\{'q':'embedding'\} \(CLI: --kinds q=embedding\) says embedding, "
                                          r"but peft names embedding factors apart, so lora_A.weight is a linear "
                                          r"module's; drop that entry"):
        detect_layout(peft, kinds={"q": "embedding"})
    assert detect_layout(peft, kinds={"emb": "embedding", "q": "linear", "*": "embedding"}).kinds == {
        "emb": "embedding", "q": "linear"}
    tune = {"m.weight": torch.zeros(4, 4), "m.lora_a.weight": torch.zeros(2, 4), "m.lora_b.weight": torch.zeros(4, 2)}
    with pytest.raises(LayoutError, match=r"m: kinds=\{'m':'embedding'\} .* says embedding, but torchtune has no "
                                          r"embeddings; drop that entry"):
        detect_layout(tune, kinds={"m": "embedding"})


def test_cli_kinds_on_a_peft_adapter_must_agree_with_its_keys(llama, tmp_path, capsys):
    base, adapter = llama
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(base), str(adapter), str(out), "--quiet", "--kinds", f"{Q0}=embedding"]) == 1
    assert (f"{Q0}: --kinds {Q0}=embedding says embedding, but peft names embedding factors apart, so lora_A.weight "
            "is a linear module's; drop that entry" in capsys.readouterr().err)
    assert main(["convert", str(adapter), str(tmp_path / "l.safetensors"), "--to", "loralib", "--base", str(base),
                 "--kinds", f"{Q0}=embedding"]) == 1
    assert "says embedding, but peft names embedding factors apart" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "l.safetensors").exists()
    assert main(["merge", str(base), str(adapter), str(out), "--quiet", "--kinds", f"{Q0}=linear"]) == 0
