"""torch.distributed.checkpoint (DCP) directories in and out, and the torchrun file-to-file merge.

DCP checkpoints here are written by ``dcp.save`` itself: in one process (``no_dist=True``) and by real
``torchrun`` process groups on CPU (gloo), sharded as FSDP2 shards them (``Shard(0)``) and as tensor
parallelism does (``Shard(1)``).
"""

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lora_ckpt import (
    CheckpointFileError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_into,
    merge_files,
    merge_lora,
)
from lora_ckpt.cli import main
from lora_ckpt.formats.dcp import DcpReader
from lora_ckpt.source import Source
from lora_ckpt.streaming.parallel import Ranks, assign_shards
from lora_ckpt.testing import assert_state_dict_close, make_gpt, make_tokens

TOKENS = make_tokens(seed=3, batch=2, length=8)
C_ATTN = "transformer.h.0.attn.c_attn.main_weight.weight"


def _save(state_dict, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled … assuming … a single process"
        dcp.save(state_dict, checkpoint_id=path, no_dist=True)
    return path


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _launch(tmp_path, *args):
    """Run ``torchrun --standalone --nproc-per-node …`` (real process groups, gloo on CPU); stop it on a hang."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers, then exits
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"torchrun {args} hung:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _torchrun(tmp_path, script, *args, n=2):
    """Run ``script`` (Python source) under torchrun with ``n`` CPU ranks."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    return _launch(tmp_path, "--nproc-per-node", n, path, *args)


def _torchrun_cli(tmp_path, *args, n=2):
    """``torchrun --nproc-per-node n -m lora_ckpt ARGS``."""
    return _launch(tmp_path, "--nproc-per-node", n, "-m", "lora_ckpt", *args)


@pytest.fixture
def lora():
    return make_gpt(attn_rank=4, wte_rank=2, randomize=True, alpha=16.0)


# --- reading -------------------------------------------------------------------------------------------


def test_flat_state_dict_reads_bit_exact(tmp_path, lora):
    sd = lora.state_dict()
    path = _save(sd, tmp_path / "ckpt")
    with Source.open(path) as src:
        assert src.kind == "dcp"
        assert list(src.keys()) == list(sd)
        assert src.entries[C_ATTN].shape == tuple(sd[C_ATTN].shape)
        torch.testing.assert_close(src.read(C_ATTN, 3, 9), sd[C_ATTN][3:9], rtol=0, atol=0)
        assert src.recorded().alpha is None
        assert [p.name for p in src.paths()] == ["ckpt", ".metadata", "__0_0.distcp"]
    assert_state_dict_close(load_checkpoint(path).state_dict, sd, rtol=0, atol=0)


def test_nested_checkpoint_dict_gives_the_model_and_its_records(tmp_path, lora):
    """A {"model": sd, "model_args": …} save (as nanoGPT and torchtune nest it): keys inside "model", alpha recorded."""
    sd = lora.state_dict()
    path = _save({"model": sd, "model_args": {"lora_alpha": 16.0, "n_layer": 2}, "iter_num": 7,
                  "optimizer": {"state": {"0": {"exp_avg": torch.ones(3)}}}}, tmp_path / "ckpt")
    ckpt = load_checkpoint(path)
    assert_state_dict_close(ckpt.state_dict, sd, rtol=0, atol=0)
    assert (ckpt.alpha, ckpt.alpha_source) == (16.0, "model_args['lora_alpha']")
    assert ckpt.extra == {"model_args": {"lora_alpha": 16.0, "n_layer": 2}, "iter_num": 7}
    with DcpReader.open(path) as r:
        assert sorted(r.others) == ["iter_num", "model_args.lora_alpha", "model_args.n_layer",
                                    "optimizer.state.0.exp_avg"]


def test_load_into_and_inspect_take_a_dcp_directory(tmp_path, lora, capsys):
    path = _save({"model": lora.state_dict(), "model_args": {"lora_alpha": 16.0}}, tmp_path / "ckpt")
    model = make_gpt(seed=5, attn_rank=4, wte_rank=2, alpha=16.0)
    load_into(model, path)
    torch.testing.assert_close(model(TOKENS), lora(TOKENS), rtol=0, atol=0)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "nanogpt_lora" and info["tensors"] == len(lora.state_dict())


# --- merging from DCP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_merge_streams_bit_identical_to_merge_lora(tmp_path, lora, dtype):
    sd = lora.state_dict()
    path = _save({"model": sd, "model_args": {"lora_alpha": 16.0}}, tmp_path / "ckpt")
    result = merge_files(path, tmp_path / "out.safetensors", dtype=dtype)
    assert result.streamed and result.merged == 3
    assert_state_dict_close(load_checkpoint(tmp_path / "out.safetensors").state_dict,
                            merge_lora(sd, alpha=16.0, dtype=dtype), rtol=0, atol=0)


def test_merged_model_computes_what_the_lora_model_computes(tmp_path):
    lora = make_gpt(attn_rank=4, randomize=True, alpha=8.0)
    path = _save(lora.state_dict(), tmp_path / "ckpt")
    assert main(["merge", str(path), str(tmp_path / "out"), "--alpha", "8", "--quiet"]) == 0
    plain = make_gpt(seed=9)
    plain.load_state_dict(load_checkpoint(tmp_path / "out").state_dict, strict=True)
    torch.testing.assert_close(plain(TOKENS), lora(TOKENS))


def test_merge_into_dcp_output_and_back(tmp_path, lora, capsys):
    sd = lora.state_dict()
    path = _save(sd, tmp_path / "ckpt")
    assert main(["merge", str(path), str(tmp_path / "merged"), "--alpha", "16", "--format", "dcp", "--quiet"]) == 0
    assert "into the DCP checkpoint" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "merged")) == [".metadata", "__0_0.distcp"]
    expected = merge_lora(sd, alpha=16.0)
    assert_state_dict_close(load_checkpoint(tmp_path / "merged").state_dict, expected, rtol=0, atol=0)
    # torch's own reader agrees (it is safe here: we wrote the file)
    theirs = {k: torch.empty_like(v) for k, v in expected.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(theirs, checkpoint_id=tmp_path / "merged", no_dist=True)
    assert_state_dict_close(theirs, expected, rtol=0, atol=0)
    # --force replaces a DCP directory; without it the output is refused
    assert main(["merge", str(path), str(tmp_path / "merged"), "--alpha", "16", "--format", "dcp", "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(path), str(tmp_path / "merged"), "--alpha", "16", "--format", "dcp", "--force",
                 "--quiet"]) == 0


def test_dcp_output_refuses_shards_and_tied(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")
    with pytest.raises(CheckpointFileError, match=r"a DCP output has its own files and no tied keys; drop "
                                                  r"max_shard_size \(CLI: --max-shard-size\)"):
        merge_files(path, tmp_path / "m", alpha=16.0, format="dcp", max_shard_size="1MB")
    with pytest.raises(CheckpointFileError, match=r"drop tied='tie' \(CLI: --tied tie\)"):
        merge_files(path, tmp_path / "m", alpha=16.0, format="dcp", tied="tie")
    assert not (tmp_path / "m").exists()


def test_llama_peft_model_saved_as_dcp_merges_to_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).eval(),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = _save(model.state_dict(), tmp_path / "ckpt")
    merge_files(path, tmp_path / "out", alpha=8.0, fan_in_fan_out=False)
    plain = transformers.LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(load_checkpoint(tmp_path / "out").state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(TOKENS).logits, model(TOKENS).logits, rtol=1e-5, atol=1e-5)


# --- sharded DCP from real process groups ----------------------------------------------------------------

SHARDED_SAVE = """
    import sys, warnings
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from lora_ckpt.testing import make_gpt
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sd = make_gpt(attn_rank=4, wte_rank=2, randomize=True, alpha=16.0).state_dict()
    # FSDP2 shards dim 0; tensor parallelism shards some weights on dim 1 (row-parallel c_proj here)
    placed = {k: distribute_tensor(v, mesh, [Shard(1) if k.endswith("c_proj.weight") else Shard(0)])
              if v.dim() else v for k, v in sd.items()}
    dcp.save({"model": placed, "model_args": {"lora_alpha": 16.0}}, checkpoint_id=sys.argv[1])
    dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    # torch's own gloo teardown has aborted intermittently on this 2-core machine ("terminate called without an
    # active exception", after or during dcp.save); the save is the fixture, not the subject: one fresh retry
    for attempt in range(2):
        tmp = tmp_path_factory.mktemp("sharded")
        proc = _torchrun(tmp, SHARDED_SAVE, tmp / "ckpt", n=2)
        if proc.returncode == 0:
            return tmp / "ckpt"
    raise AssertionError(f"torchrun failed twice (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def test_fsdp_and_tp_sharded_dcp_reads_whole(sharded):
    sd = make_gpt(attn_rank=4, wte_rank=2, randomize=True, alpha=16.0).state_dict()
    with DcpReader.open(sharded) as r:
        assert len(r.tensors[C_ATTN].chunks) == 2
        assert [c.offsets for c in r.tensors["transformer.h.0.attn.c_proj.weight"].chunks] == [(0, 0), (0, 16)]
        for key in (C_ATTN, "transformer.h.0.attn.c_proj.weight"):  # a row range across both ranks' chunks
            torch.testing.assert_close(r.read(key, 5, 27), sd[key][5:27], rtol=0, atol=0)
    assert_state_dict_close(load_checkpoint(sharded).state_dict, sd, rtol=0, atol=0)


def test_sharded_dcp_merges_bit_identical(sharded, tmp_path):
    sd = make_gpt(attn_rank=4, wte_rank=2, randomize=True, alpha=16.0).state_dict()
    merge_files(sharded, tmp_path / "out", options=None)
    assert_state_dict_close(load_checkpoint(tmp_path / "out").state_dict, merge_lora(sd, alpha=16.0), rtol=0, atol=0)


# --- hostile and damaged directories ---------------------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_pickle_that_would_run_code_is_refused(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to load, the DCP metadata pickle asks "
                                                    r"for 'posix'\.'system', which DCP metadata never holds"):
        Source.open(path)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    assert main(["merge", str(path), str(tmp_path / "out"), "--alpha", "1"]) == 1
    assert not (tmp_path / "out").exists()


def _rewrite_metadata(path, change):
    """Load our own test file's metadata with torch's unpickler (trusted here), change it, write it back."""
    meta = pickle.loads((path / ".metadata").read_bytes())
    change(meta)
    (path / ".metadata").write_bytes(pickle.dumps(meta))


def test_missing_shard_file_is_named(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")
    (path / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointFileError, match=r"ckpt: \.metadata names '__0_0\.distcp' \(holding "
                                                  r".*\), which is not in the folder; the checkpoint is incomplete"):
        Source.open(path)


def test_truncated_shard_file(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")
    f = path / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointFileError, match=r"__0_0\.distcp: truncated \(\d+ bytes; \.metadata places .* at "
                                                  r"bytes \d+\.\.\d+\)"):
        Source.open(path)


def test_path_outside_the_folder_is_refused(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")
    shutil.copy(path / "__0_0.distcp", tmp_path / "outside.distcp")

    def escape(meta):
        for info in meta.storage_data.values():
            info.relative_path = "../outside.distcp"
    _rewrite_metadata(path, escape)
    with pytest.raises(CheckpointFileError, match=r"names '\.\./outside\.distcp', outside the folder; refusing"):
        Source.open(path)


def test_chunks_that_do_not_cover_the_tensor(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")

    def shrink(meta):
        meta.state_dict_metadata[C_ATTN].size = torch.Size([200, 32])
    _rewrite_metadata(path, shrink)
    with pytest.raises(CheckpointFileError, match=rf"corrupt DCP metadata \({C_ATTN}: chunk at \(0, 0\) of size "
                                                  r"\(96, 32\) does not fit|cover"):
        Source.open(path)


def _tiled(path, whole, blocks):
    """A DCP directory holding ``whole`` as ``fc.weight`` in the chunks ``blocks`` ((offsets, sizes) each), as listed.

    Each block is saved as its own record, then ``.metadata`` is rewritten to list them as chunks of one tensor:
    blocks may repeat, overlap or leave gaps, as a hostile or damaged metadata file would.
    """
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    _save({f"part{i}": whole[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone()
           for i, (offsets, sizes) in enumerate(blocks)}, path)

    def tile(meta):
        records = {k.fqn: v for k, v in meta.storage_data.items()}
        props = meta.state_dict_metadata["part0"].properties
        meta.storage_data = {MetadataIndex("fc.weight", offsets): records[f"part{i}"]
                             for i, (offsets, _) in enumerate(blocks)}
        chunks = [ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)) for offsets, sizes in blocks]
        meta.state_dict_metadata = {"fc.weight": TensorStorageMetadata(props, whole.shape, chunks)}
        meta.planner_data = {"fc.weight": ("fc.weight",)}
    _rewrite_metadata(path, tile)
    return path


ROWS = torch.arange(1100 * 4, dtype=torch.float32).reshape(1100, 4)  # row i holds 4i .. 4i+3


def test_more_than_1024_chunks_read_exactly(tmp_path):
    rows = [*range(1, 1100, 2), *range(0, 1100, 2)]  # 1100 one-row chunks, listed out of order
    path = _tiled(tmp_path / "ckpt", ROWS, [((r, 0), (1, 4)) for r in rows])
    torch.testing.assert_close(load_checkpoint(path).state_dict["fc.weight"], ROWS, rtol=0, atol=0)
    with DcpReader.open(path) as r:
        assert len(r.tensors["fc.weight"].chunks) == 1100
        torch.testing.assert_close(r.read("fc.weight", 1020, 1100), ROWS[1020:], rtol=0, atol=0)


def test_more_than_1024_chunks_with_a_duplicate_hiding_a_gap(tmp_path):
    """Row 0 twice, row 1099 missing: the element count adds up, the rows do not (once read as uninitialised memory)."""
    path = _tiled(tmp_path / "ckpt", ROWS, [((r, 0), (1, 4)) for r in [0, *range(1099)]])
    with pytest.raises(CheckpointFileError, match=r"ckpt/\.metadata: corrupt DCP metadata \(fc\.weight: its chunks "
                                                  r"overlap: 2 hold the element at \(0, 0\) \(they add up to 4400 of "
                                                  r"its 4400 elements\)\)"):
        load_checkpoint(path)


def test_more_than_1024_chunks_with_a_gap_name_the_missing_row(tmp_path):
    path = _tiled(tmp_path / "ckpt", ROWS, [((r, 0), (1, 4)) for r in range(1100) if r != 1037])
    with pytest.raises(CheckpointFileError, match=r"corrupt DCP metadata \(fc\.weight: its chunks cover 4396 of "
                                                  r"4400 elements and none holds the element at \(1037, 0\); a rank's "
                                                  r"file is missing from the metadata\)"):
        Source.open(path)


GRID = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
GRID_BLOCKS = [((i, j), (2, 2)) for i in (0, 2) for j in (0, 2, 4)]  # a 2 x 3 grid, as a 2-D device mesh saves it


def test_2d_grid_reads_exactly_and_a_missing_cell_is_refused(tmp_path):
    path = _tiled(tmp_path / "grid", GRID, GRID_BLOCKS)
    torch.testing.assert_close(load_checkpoint(path).state_dict["fc.weight"], GRID, rtol=0, atol=0)
    holed = _tiled(tmp_path / "holed", GRID, [b for b in GRID_BLOCKS if b[0] != (2, 2)])
    with pytest.raises(CheckpointFileError, match=r"holed/\.metadata: corrupt DCP metadata \(fc\.weight: its chunks "
                                                  r"cover 20 of 24 elements and none holds the element at \(2, 2\); a "
                                                  r"rank's file is missing from the metadata\)"):
        load_checkpoint(holed)


def test_chunks_that_are_not_a_grid_are_checked_exactly(tmp_path):
    """Rows 0-1 split at column 2, rows 2-3 at column 3: not a grid, but each element held once; then one overlapping."""
    brick = [((0, 0), (2, 2)), ((0, 2), (2, 4)), ((2, 0), (2, 3)), ((2, 3), (2, 3))]
    path = _tiled(tmp_path / "brick", GRID, brick)
    torch.testing.assert_close(load_checkpoint(path).state_dict["fc.weight"], GRID, rtol=0, atol=0)
    # the last block (rows 2-3 of column 2) lies over the one before at (2, 2) and leaves (3, 1) empty: 6+3+4+9+2 = 24
    bad = [((0, 0), (1, 6)), ((1, 0), (3, 1)), ((1, 3), (3, 3)), ((1, 1), (2, 2)), ((2, 2), (2, 1))]
    path = _tiled(tmp_path / "bad", GRID, bad)
    with pytest.raises(CheckpointFileError, match=r"fc\.weight: its chunks overlap: 2 hold the element at \(2, 2\) "
                                                  r"\(they add up to 24 of its 24 elements\)"):
        Source.open(path)


def test_chunks_split_along_too_many_dimensions_to_check(tmp_path):
    cube = torch.zeros((2,) * 18)
    path = _tiled(tmp_path / "ckpt", cube, [((0,) * 18, (1,) * 18), ((1,) * 18, (1,) * 18)])
    with pytest.raises(CheckpointFileError, match=r"fc\.weight: its 2 chunks split 18 dimensions: too many corners "
                                                  r"\(2 \* 2\*\*18\) to check that they hold each element once; "
                                                  r"re-save with fewer chunks\)"):
        Source.open(path)


def test_metadata_that_is_not_dcp_metadata(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")
    (path / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointFileError, match=r"corrupt DCP metadata \(a pickled dict, not DCP Metadata\)"):
        Source.open(path)
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointFileError, match=r"corrupt DCP metadata \("):
        Source.open(path)


def test_transformed_records_are_refused(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")

    def compress(meta):
        for info in meta.storage_data.values():
            info.transform_descriptors = ["zstd"]
    _rewrite_metadata(path, compress)
    with pytest.raises(CheckpointFileError, match=r"is stored transformed \(\['zstd'\], e\.g\. compressed\); "
                                                  r"lora_ckpt reads plain DCP records only"):
        Source.open(path)


def test_record_that_does_not_hold_its_chunk(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")

    def swap(meta):
        by_fqn = {k.fqn: k for k in meta.storage_data}
        a, b = by_fqn[C_ATTN], by_fqn["transformer.wpe.weight"]
        meta.storage_data[a], meta.storage_data[b] = meta.storage_data[b], meta.storage_data[a]
    _rewrite_metadata(path, swap)
    with Source.open(path) as src, pytest.raises(CheckpointFileError, match=rf"the record of {C_ATTN} at byte \d+ "
                                                                            r"holds a torch.float32 tensor of shape"):
        src.read(C_ATTN)


def test_pickled_record_that_would_run_code(tmp_path, lora):
    path = _save(lora.state_dict(), tmp_path / "ckpt")
    evil = tmp_path / "evil.distcp"
    torch.save(_RunsCode(), evil)
    data = (path / "__0_0.distcp").read_bytes()

    def point(meta):
        for k, info in meta.storage_data.items():
            if k.fqn == C_ATTN:
                info.offset, info.length = len(data), evil.stat().st_size
    _rewrite_metadata(path, point)
    (path / "__0_0.distcp").write_bytes(data + evil.read_bytes())
    with Source.open(path) as src, pytest.raises(UnsafeCheckpointError, match=r"refusing to load, weights_only=True "
                                                                             r"rejected it"):
        src.read(C_ATTN)
    assert not os.path.exists("pwned")


# --- the torchrun file-to-file merge -----------------------------------------------------------------------


def test_torchrun_merge_writes_the_same_bytes_as_one_process(llama, tmp_path):
    base, adapter = llama
    assert main(["merge", str(base), str(adapter), str(tmp_path / "one"), "--max-shard-size", "100kB", "--quiet"]) == 0
    proc = _torchrun_cli(tmp_path, "merge", base, adapter, tmp_path / "two", "--max-shard-size", "100kB", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 1 and "merged" in proc.stdout  # rank 0 reports
    assert len(_digest(tmp_path / "one")) == 10  # 8 shards, the index, config.json
    assert _digest(tmp_path / "two") == _digest(tmp_path / "one")
    assert not [p for p in tmp_path.iterdir() if ".lora-ckpt-" in p.name]


def test_torchrun_merge_of_a_sharded_dcp(sharded, tmp_path):
    assert main(["merge", str(sharded), str(tmp_path / "one"), "--max-shard-size", "20kB", "--quiet"]) == 0
    proc = _torchrun_cli(tmp_path, "merge", sharded, tmp_path / "two", "--max-shard-size", "20kB", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(tmp_path / "two") == _digest(tmp_path / "one")


def test_torchrun_merge_failure_leaves_nothing(llama, tmp_path):
    base, adapter = llama
    (tmp_path / "two").mkdir()
    proc = _torchrun_cli(tmp_path, "merge", base, adapter, tmp_path / "two", "--max-shard-size", "100kB", "--quiet")
    assert proc.returncode != 0
    assert "already exists" in proc.stderr
    assert os.listdir(tmp_path / "two") == []


def test_ranks_refuse_outputs_that_do_not_split(llama, tmp_path):
    base, adapter = llama
    with pytest.raises(CheckpointFileError, match=r"out\.pt: a merge across 2 ranks writes safetensors"):
        merge_files(base, tmp_path / "out.pt", adapter=adapter, ranks=Ranks(rank=0, world=2))


def test_ranks_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Ranks.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(CheckpointFileError, match=r"WORLD_SIZE='two', RANK='0': not integers; launch with torchrun"):
        Ranks.from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(CheckpointFileError, match=r"RANK=5 is outside WORLD_SIZE=2; launch with torchrun"):
        Ranks.from_env()


def test_shards_are_balanced_by_bytes():
    assert assign_shards([5, 9, 4, 4], 2) == [1, 0, 1, 0]
    assert assign_shards([1, 1, 1], 4) == [0, 1, 2]
    assert Ranks(rank=1, world=2).mine([5, 9, 4, 4]) == [0, 2]


def test_cli_usage_error_for_an_unknown_format(tmp_path, capsys):
    assert main(["merge", "a", "b", "--format", "gguf"]) == 2
    assert "invalid choice: 'gguf'" in capsys.readouterr().err


def test_convert_to_standard_dcp_and_refusal_for_lora_layouts(tmp_path, lora, capsys):
    sd = lora.state_dict()
    path = _save(sd, tmp_path / "ckpt")
    assert main(["convert", str(path), str(tmp_path / "std"), "--to", "standard", "--format", "dcp", "--alpha", "16",
                 "--quiet"]) == 0
    assert_state_dict_close(load_checkpoint(tmp_path / "std").state_dict, merge_lora(sd, alpha=16.0), rtol=0, atol=0)
    assert main(["convert", str(path), str(tmp_path / "tt"), "--to", "torchtune", "--format", "dcp"]) == 1
    assert ("format='dcp' (CLI: --format dcp) writes merged weights; use to='standard' (CLI: --to standard)"
            .replace("format='dcp' (CLI: --format dcp)", "--format dcp").replace("to='standard' (CLI: --to standard)",
                                                                                "--to standard")
            in capsys.readouterr().err)


def test_dcp_records_no_ties_so_tie_is_refused_and_a_tied_embedding_update_is_said(tmp_path, lora, capsys):
    """The wte update of a tied nanoGPT saved as DCP: DCP stores wte and lm_head apart and records no tie."""
    path = _save({"model": lora.state_dict(), "model_args": {"lora_alpha": 16.0}}, tmp_path / "ckpt")
    assert main(["merge", str(path), str(tmp_path / "tied"), "--tied", "tie", "--quiet"]) == 1
    assert "a DCP checkpoint does not record which weights are tied, so --tied tie has nothing to tie" in \
        capsys.readouterr().err
    assert not (tmp_path / "tied").exists()
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "is a DCP checkpoint, which does not record tied weights: if the model ties transformer.wte.weight and " \
           "lm_head.weight (karpathy's nanoGPT ties wte and lm_head), the merged output keeps them apart" in err


def test_tie_with_a_folder_output_ties(tmp_path, lora, capsys):
    """--tied tie used to be ignored for folder outputs (they always streamed, untied)."""
    src = tmp_path / "lora.pt"
    torch.save({"model": lora.state_dict(), "model_args": {"lora_alpha": 16.0}}, src)
    assert main(["merge", str(src), str(tmp_path / "folder"), "--tied", "tie", "--quiet"]) == 0
    assert "tied group transformer.wte.weight = lm_head.weight: tied to the merged weight" in capsys.readouterr().out
    sd = load_checkpoint(tmp_path / "folder").state_dict
    assert torch.equal(sd["transformer.wte.weight"], sd["lm_head.weight"])
