"""Merging and loading on FSDP2 / tensor-parallel shards, in real gloo process groups on the CPU.

One group per world size runs every scenario below on every rank (process start-up dominates: a few seconds
each); each test then reads its scenario's outcome on every rank. Shards are compared against the single-process
merge of the full state dict: bit for bit.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError as e:  # pragma: no cover - torch < 2.6
    pytest.skip(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available: {e}", allow_module_level=True)

from lora_ckpt import (
    CheckpointFileError, LayoutError, LoraCkptError, ShapeError, TiedWeightError, load_into, merge_lora,
    merged_state_dict, save_checkpoint,
)
from lora_ckpt.testing import make_gpt, make_tokens

C_ATTN = "transformer.h.0.attn.c_attn"


# --- helpers that run inside the ranks -----------------------------------------------------------


def _mesh(shape, names=None):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _fsdp(model, mesh=None):
    """FSDP2 as torchtune and torchtitan apply it: each block, then the root."""
    mesh = mesh if mesh is not None else _mesh((dist.get_world_size(),))
    inner = model.base_model.model.model.layers if hasattr(model, "base_model") else model.transformer.h
    for block in inner:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(sd):
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sd.items()}


def _assert_bit_equal(actual, expected):
    assert list(actual) == list(expected), (list(actual), list(expected))
    for k in expected:
        a = actual[k]
        assert a.dtype == expected[k].dtype, (k, a.dtype, expected[k].dtype)
        assert torch.equal(a, expected[k]), f"{k}: max diff {(a.float() - expected[k].float()).abs().max()}"


def _assert_placed_like_bases(merged, sharded_sd, pairs):
    """Each merged weight is a DTensor placed like its base, and this rank holds only its block of it."""
    for out_key, base_key in pairs:
        m, b = merged[out_key], sharded_sd[base_key]
        assert isinstance(m, DTensor), out_key
        assert m.placements == b.placements and m.device_mesh == b.device_mesh, (out_key, m.placements, b.placements)
        assert m.to_local().shape == b.to_local().shape, out_key
        if dist.get_world_size() > 1:
            assert m.to_local().numel() < m.numel(), out_key


def _gpt(**kw):
    # vocab 67 and 3 * 34 = 102 rows: chunks of unequal sizes on 2 and 4 ranks
    return make_gpt(attn_rank=4, wte_rank=2, randomize=True, vocab_size=67, n_embd=34, n_head=2, **kw)


def _logits(model):
    with torch.no_grad():
        return model(make_tokens(seed=3, batch=2, length=12, vocab_size=67))


def _llama_peft(dtype=torch.float32, **lora):
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=66, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(**{**dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj", "embed_tokens"]), **lora}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.05)
    return model


# --- scenarios: each runs on every rank ----------------------------------------------------------


def nanogpt_fp32_bit_exact(tmp):
    lora = _gpt()
    expected = merge_lora(lora.state_dict(), alpha=16.0)  # the single-process merge of the full state dict
    sharded = _fsdp(copy.deepcopy(lora))
    merged = merged_state_dict(sharded)
    _assert_bit_equal(_full(merged), expected)
    sd = sharded.state_dict()
    _assert_placed_like_bases(merged, sd, [(f"{C_ATTN}.weight", f"{C_ATTN}.main_weight.weight"),
                                           ("transformer.wte.weight", "transformer.wte.main_weight.weight")])
    assert merged["lm_head.weight"] is not merged["transformer.wte.weight"]  # tied="untie": the head keeps its base


def nanogpt_bf16_one_rounding(tmp):
    lora = _gpt(dtype=torch.bfloat16)
    expected = merge_lora(lora.state_dict(), alpha=16.0)
    merged = _full(merged_state_dict(_fsdp(copy.deepcopy(lora))))
    _assert_bit_equal(merged, expected)  # the same fp32 accumulation and one rounding per block: bit for bit
    exact = merge_lora(lora.state_dict(), alpha=16.0, dtype=torch.float32)
    for k in expected:  # and within one bf16 rounding of the exact sum
        torch.testing.assert_close(merged[k].float(), exact[k], rtol=2**-8, atol=0)


def nanogpt_dtype_and_tie(tmp):
    lora = _gpt()
    sharded = _fsdp(copy.deepcopy(lora))
    tied = merged_state_dict(sharded, tied="tie", dtype=torch.bfloat16)
    _assert_bit_equal(_full(tied), merge_lora(lora.state_dict(), alpha=16.0, tied="tie", dtype=torch.bfloat16))
    assert tied["lm_head.weight"] is tied["transformer.wte.weight"]


def lora_only_embedding(tmp):
    lora = make_gpt(attn_rank=4, wte_rank=4, wte_lora_only=True, randomize=True, vocab_size=67, n_embd=34)
    expected = merge_lora(lora.state_dict(), alpha=16.0)
    merged = merged_state_dict(_fsdp(copy.deepcopy(lora)))
    _assert_bit_equal(_full(merged), expected)
    wte = merged["transformer.wte.weight"]
    assert wte.placements == (Shard(0),) and wte.to_local().shape[0] < 67


def llama_peft_fp32_bit_exact(tmp):
    model = _llama_peft()
    expected = merged_state_dict(model)  # single process: merge_lora of the live state dict
    sharded = _fsdp(copy.deepcopy(model))
    merged = merged_state_dict(sharded)
    _assert_bit_equal(_full(merged), expected)
    q = "model.layers.0.self_attn.q_proj"
    _assert_placed_like_bases(merged, sharded.state_dict(),
                              [(f"{q}.weight", f"base_model.model.{q}.base_layer.weight"),
                               ("model.embed_tokens.weight", "base_model.model.model.embed_tokens.base_layer.weight")])


def llama_peft_bf16(tmp):
    model = _llama_peft(torch.bfloat16)
    expected = merged_state_dict(model)
    _assert_bit_equal(_full(merged_state_dict(_fsdp(copy.deepcopy(model)))), expected)


def dcp_save_then_plain_model_logits(tmp):
    import torch.distributed.checkpoint as dcp

    lora = _gpt()
    merged = merged_state_dict(_fsdp(copy.deepcopy(lora)))
    folder = Path(tmp) / "dcp_merged"
    dcp.save(merged, checkpoint_id=str(folder))
    dist.barrier()
    plain = make_gpt(vocab_size=67, n_embd=34, n_head=2, seed=7)
    plain.lm_head.weight = torch.nn.Parameter(plain.lm_head.weight.detach().clone())  # the merge untied them
    into = {k: torch.empty_like(v) for k, v in plain.state_dict().items()}
    dcp.load(into, checkpoint_id=str(folder))
    plain.load_state_dict(into, strict=True)
    torch.testing.assert_close(_logits(plain), _logits(lora))


def load_into_round_trip(tmp):
    folder = Path(tmp)
    src = _gpt(seed=11)
    path = folder / "lora.safetensors"
    if dist.get_rank() == 0:
        save_checkpoint(path, src.state_dict(), alpha=16.0)
    dist.barrier()
    target = _fsdp(_gpt(seed=12))
    plain_target = _gpt(seed=12)
    report = load_into(target, path)
    expected = load_into(plain_target, path)
    assert str(report) == str(expected)
    _assert_bit_equal(_full(target.state_dict()), src.state_dict())
    torch.testing.assert_close(_logits(plain_target), _logits(src))
    # and back out: the sharded model merges to what the source merges to
    _assert_bit_equal(_full(merged_state_dict(target)), merge_lora(src.state_dict(), alpha=16.0))


def load_into_standard_and_rank_change(tmp):
    folder = Path(tmp)
    plain = make_gpt(vocab_size=67, n_embd=34, n_head=2, seed=21)
    other_rank = make_gpt(attn_rank=2, wte_rank=2, randomize=True, vocab_size=67, n_embd=34, n_head=2, seed=22)
    if dist.get_rank() == 0:
        save_checkpoint(folder / "plain.safetensors", plain.state_dict())
        torch.save({"model": other_rank.state_dict(), "model_args": {"lora_alpha": 16.0}}, folder / "rank2.pt")
    dist.barrier()
    for name in ("plain.safetensors", "rank2.pt"):
        target, reference = _fsdp(_gpt(seed=23)), _gpt(seed=23)
        report = load_into(target, folder / name)
        assert str(report) == str(load_into(reference, folder / name))
        _assert_bit_equal(_full(target.state_dict()), reference.state_dict())
    # an in-memory state dict whose values are the shards of another sharded model
    target, reference = _fsdp(_gpt(seed=24)), _gpt(seed=24)
    source = _fsdp(_gpt(seed=25))
    load_into(target, source.state_dict(), alpha=16.0)
    load_into(reference, _gpt(seed=25).state_dict(), alpha=16.0)
    _assert_bit_equal(_full(target.state_dict()), reference.state_dict())


def _tensor_parallel(model):
    """Row-wise TP on block 0's c_attn (W and A Shard(1), B replicated), column-wise on block 1's (W Shard(0),
    A Shard(0) on its rank dimension, B replicated). No FSDP: the other modules stay plain tensors."""
    tp = copy.deepcopy(model)
    mesh = _mesh((dist.get_world_size(),))
    for i, block in enumerate(tp.transformer.h):
        c = block.attn.c_attn
        w_place, a_place, b_place = (
            ([Shard(1)], [Shard(1)], [Replicate()]) if i == 0 else ([Shard(0)], [Shard(0)], [Replicate()])
        )
        for mod, place in ((c.main_weight, w_place), (c.lora_A, a_place), (c.lora_B, b_place)):
            mod.weight = torch.nn.Parameter(distribute_tensor(mod.weight.detach(), mesh, place),
                                            requires_grad=mod.weight.requires_grad)
        c.main_weight.bias = torch.nn.Parameter(distribute_tensor(c.main_weight.bias.detach(), mesh, [Replicate()]),
                                                requires_grad=False)
    return tp


def tensor_parallel_shard1(tmp):
    for dtype in (torch.float32, torch.bfloat16):
        lora = _gpt(dtype=dtype)
        merged = merged_state_dict(_tensor_parallel(lora))
        _assert_bit_equal(_full(merged), merge_lora(lora.state_dict(), alpha=16.0))
        assert merged[f"{C_ATTN}.weight"].placements == (Shard(1),)
        assert merged["transformer.h.1.attn.c_attn.weight"].placements == (Shard(0),)
        assert not isinstance(merged["transformer.h.0.attn.c_proj.weight"], DTensor)
    # a rank-2 checkpoint loaded into the rank-4 TP model: its update merged into each rank's columns
    other = make_gpt(attn_rank=2, wte_rank=2, randomize=True, vocab_size=67, n_embd=34, n_head=2, seed=31)
    target, reference = _tensor_parallel(_gpt(seed=32)), _gpt(seed=32)
    report = load_into(target, other.state_dict(), alpha=16.0)
    assert str(report) == str(load_into(reference, other.state_dict(), alpha=16.0))
    _assert_bit_equal(_full(target.state_dict()), reference.state_dict())
    # from files: each rank reads its rows and keeps its columns (copied factors and bases, a merged update)
    if dist.get_rank() == 0:
        save_checkpoint(Path(tmp) / "tp-rank2.safetensors", other.state_dict(), alpha=16.0)
        save_checkpoint(Path(tmp) / "tp-rank4.safetensors", _gpt(seed=33).state_dict(), alpha=16.0)
    dist.barrier()
    for name in ("tp-rank2.safetensors", "tp-rank4.safetensors"):
        target, reference = _tensor_parallel(_gpt(seed=34)), _gpt(seed=34)
        report = load_into(target, Path(tmp) / name)
        assert str(report) == str(load_into(reference, Path(tmp) / name))
        _assert_bit_equal(_full(target.state_dict()), reference.state_dict())


def fsdp_over_tensor_parallel(tmp):
    """A 2-D mesh (dp x tp): TP column-wise on c_attn (W, B Shard(0)), then FSDP2 over dp (strided sharding)."""
    lora = _gpt()
    model = copy.deepcopy(lora)
    mesh = _mesh((2, dist.get_world_size() // 2), ("dp", "tp"))
    for block in model.transformer.h:
        c = block.attn.c_attn
        for mod, place in ((c.main_weight, [Shard(0)]), (c.lora_A, [Replicate()]), (c.lora_B, [Shard(0)])):
            mod.weight = torch.nn.Parameter(distribute_tensor(mod.weight.detach(), mesh["tp"], place),
                                            requires_grad=mod.weight.requires_grad)
        c.main_weight.bias = torch.nn.Parameter(distribute_tensor(c.main_weight.bias.detach(), mesh["tp"], [Shard(0)]),
                                                requires_grad=False)
    _fsdp(model, mesh["dp"])
    merged = merged_state_dict(model)
    _assert_bit_equal(_full(merged), merge_lora(lora.state_dict(), alpha=16.0))
    w = merged[f"{C_ATTN}.weight"]
    assert len(w.placements) == 2 and w.to_local().shape[0] * dist.get_world_size() <= 102 + 4


def errors_are_raised_on_every_rank(tmp):
    out = {}
    # a module whose base is a DTensor and whose factors are plain tensors
    mixed = _gpt()
    mesh = _mesh((dist.get_world_size(),))
    w = mixed.transformer.h[0].attn.c_attn.main_weight
    w.weight = torch.nn.Parameter(distribute_tensor(w.weight.detach(), mesh, [Shard(0)]), requires_grad=False)
    with pytest.raises(LayoutError) as e:
        merged_state_dict(mixed)
    out["mixed"] = str(e.value)
    # DoRA
    dora = _llama_peft(target_modules=["q_proj"], use_dora=True)
    with pytest.raises(LayoutError) as e:
        merged_state_dict(_fsdp(dora))
    out["dora"] = str(e.value)
    # NaN in one rank's shard only: every rank raises the same error, none waits forever
    broken = _gpt()
    with torch.no_grad():
        broken.transformer.h[1].attn.c_attn.lora_B.weight[-1, 0] = float("nan")  # the last rows: the last rank
    with pytest.raises(ShapeError) as e:
        merged_state_dict(_fsdp(broken))
    out["nan"] = str(e.value)
    # overflow of a block on one rank: found after the arithmetic, raised everywhere
    huge = _gpt(dtype=torch.bfloat16)
    with torch.no_grad():
        c = huge.transformer.h[0].attn.c_attn
        c.lora_A.weight.fill_(1e10)
        c.lora_B.weight[-1, :] = 1e30  # 4 * 1e40 overflows even the float32 sum, on the last rank's rows only
    with pytest.raises(ShapeError) as e:
        merged_state_dict(_fsdp(huge))
    out["overflow"] = str(e.value)
    # loading a merged (untied) checkpoint into a sharded model that ties wte and lm_head
    lora_sd = merge_lora(_gpt().state_dict(), alpha=16.0)
    with pytest.raises(TiedWeightError) as e:
        load_into(_fsdp(make_gpt(vocab_size=67, n_embd=34, n_head=2)), lora_sd, tied="untie")
    out["untie"] = str(e.value)
    with pytest.raises(TiedWeightError) as e:  # the default: the advice must be one that works on a sharded model
        load_into(_fsdp(make_gpt(vocab_size=67, n_embd=34, n_head=2)), lora_sd)
    out["tied"] = str(e.value)
    # arguments that differ between ranks: refused on every rank at once, naming the argument (no gloo timeout)
    rank, last = dist.get_rank(), dist.get_world_size() - 1
    with pytest.raises(LoraCkptError) as e:
        merged_state_dict(_fsdp(_gpt()), alpha=16.0 if rank == 0 else 8.0)  # the model records 16
    out["alpha_differs"] = str(e.value)
    with pytest.raises(LoraCkptError) as e:
        load_into(_fsdp(_gpt()), _gpt(seed=5).state_dict(), alpha=16.0 if rank == 0 else 8.0)
    out["load_alpha_differs"] = str(e.value)
    # a checkpoint path that exists on rank 0's storage only (the same relative path, each rank in its own folder)
    own = Path(tmp) / f"storage{rank}"
    own.mkdir(exist_ok=True)
    if rank == 0:
        save_checkpoint(own / "lora.safetensors", _gpt(seed=6).state_dict(), alpha=16.0)
    cwd = os.getcwd()
    os.chdir(own)
    try:
        with pytest.raises(CheckpointFileError) as e:
            load_into(_fsdp(_gpt()), "lora.safetensors")
    finally:
        os.chdir(cwd)
    out["missing_on_one_rank"] = str(e.value)
    # a plain RuntimeError on the last rank only, before any collective of the merge (reading its module's scale)
    odd = _gpt()
    if rank == last:
        odd.transformer.h[0].attn.c_attn.alpha = torch.tensor([16.0, 16.0])  # .item() raises RuntimeError
    with pytest.raises(Exception) as e:
        merged_state_dict(_fsdp(odd))
    out["runtime"] = [type(e.value).__name__, str(e.value)]
    return out


SCENARIOS_2 = [nanogpt_fp32_bit_exact, nanogpt_bf16_one_rounding, nanogpt_dtype_and_tie, lora_only_embedding,
               llama_peft_fp32_bit_exact, llama_peft_bf16, dcp_save_then_plain_model_logits, load_into_round_trip,
               load_into_standard_and_rank_change, tensor_parallel_shard1, errors_are_raised_on_every_rank]
SCENARIOS_4 = [nanogpt_fp32_bit_exact, llama_peft_fp32_bit_exact, lora_only_embedding, tensor_parallel_shard1,
               fsdp_over_tensor_parallel, errors_are_raised_on_every_rank]


def _worker(rank, world_size, port, folder, names):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    scenarios = {f.__name__: f for f in (*SCENARIOS_2, *SCENARIOS_4)}
    for name in names:
        try:
            results[name] = {"ok": True, "value": scenarios[name](folder)}
        except Exception:  # noqa: BLE001 - reported to the test that owns the scenario
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()
    Path(folder, f"rank{rank}.part").write_text(json.dumps(results))
    os.replace(Path(folder, f"rank{rank}.part"), Path(folder, f"rank{rank}.json"))  # whole, or absent
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(tmp_path_factory, world_size, scenarios):
    import torch.multiprocessing as mp

    for attempt in range(2):
        folder = tmp_path_factory.mktemp(f"dist{world_size}")
        ctx = mp.start_processes(_worker, args=(world_size, _free_port(), str(folder), [f.__name__ for f in scenarios]),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + 240
        try:
            while not ctx.join(timeout=5):  # returns when one rank ends; an error in a rank is raised here
                if time.monotonic() > deadline:  # pragma: no cover - a hang
                    for p in ctx.processes:
                        p.terminate()
                    pytest.fail(f"the {world_size}-rank group did not finish in 240 s")
        except mp.ProcessExitedException:
            # torch's own gloo teardown has aborted intermittently on this 2-core machine ("terminate called without
            # an active exception"): results every rank wrote before destroy_process_group are whole; a rank that
            # died before writing them gets one fresh retry of the whole group
            if all(Path(folder, f"rank{r}.json").exists() for r in range(world_size)):
                break
            if attempt:
                raise
            continue
        break
    return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _run_group(tmp_path_factory, 2, SCENARIOS_2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _run_group(tmp_path_factory, 4, SCENARIOS_4)


def _outcome(ranks, scenario):
    failed = [f"rank {r}:\n{res[scenario.__name__]['error']}" for r, res in enumerate(ranks)
              if not res[scenario.__name__]["ok"]]
    assert not failed, "\n".join(failed)
    return [res[scenario.__name__]["value"] for res in ranks]


@pytest.mark.parametrize("scenario", SCENARIOS_2, ids=lambda f: f.__name__)
def test_two_ranks(two_ranks, scenario):
    _outcome(two_ranks, scenario)


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS_4 if s is not errors_are_raised_on_every_rank],
                         ids=lambda f: f.__name__)
def test_four_ranks(four_ranks, scenario):
    _outcome(four_ranks, scenario)


def test_errors_are_raised_on_every_rank_with_one_message(two_ranks, four_ranks):
    for ranks in (two_ranks, four_ranks):
        said = _outcome(ranks, errors_are_raised_on_every_rank)
        *others, failing = [s.pop("runtime") for s in said]
        assert all(s == said[0] for s in said)  # the same message on every rank
        # not lora_ckpt's own error: the rank that raised it re-raises it, the others say which rank failed and why
        boom = "a Tensor with 2 elements cannot be converted to Scalar"
        assert failing == ["RuntimeError", boom]
        assert others == [["LoraCkptError", f"rank {len(others)} failed: RuntimeError: {boom}"]] * len(others)
    msg = said[0]
    assert msg["alpha_differs"] == ("the ranks passed different alpha: 16.0 on rank 0, 8.0 on rank 1; every rank must "
                                    "pass the same arguments (and see the same checkpoint)")
    assert msg["load_alpha_differs"] == msg["alpha_differs"]
    assert msg["missing_on_one_rank"] == "lora.safetensors: no such file or folder"
    assert msg["mixed"] == (
        "LoRA modules mix DTensors and plain tensors: transformer.h.0.attn.c_attn (transformer.h.0.attn.c_attn."
        "main_weight.weight is a DTensor, transformer.h.0.attn.c_attn.lora_A.weight a plain tensor); a plain tensor "
        "beside DTensors may be a replica or a rank's piece, and nothing says which: shard the whole module with its "
        "factors (fully_shard or parallelize_module it as one)"
    )
    assert msg["dora"].startswith("model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj: DoRA modules "
                                  "cannot be merged on shards")
    assert msg["nan"] == ("transformer.h.1.attn.c_attn.lora_B.weight holds NaN or infinite values; the adapter is "
                          "broken (a diverged run?): merge a good checkpoint")
    assert msg["overflow"].startswith("transformer.h.0.attn.c_attn: the merged weight has non-finite values in "
                                      "bfloat16")
    assert msg["tied"].endswith("choose untie them in the model before fully_shard, then pass tied='untie' (a sharded "
                                "model's parameters cannot be untied afterwards)")
    assert msg["untie"] == ("lm_head.weight: tied to another key, and a sharded model's parameters cannot be untied "
                            "after fully_shard; untie them before sharding, or pass tied='tie'")


def test_plain_models_never_touch_torch_distributed():
    from lora_ckpt.distributed import holds_dtensors

    lora = make_gpt(attn_rank=4, randomize=True)
    assert not holds_dtensors(lora.state_dict())
    assert not dist.is_initialized()
    _ = merged_state_dict(lora)
    assert not dist.is_initialized()
