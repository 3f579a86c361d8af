"""Hub ids and ``hf://`` URLs, read offline from a Hugging Face cache built in the test; adapters that name their base.

The cache follows huggingface_hub's documented layout (``models--ORG--NAME/refs/main``, ``snapshots/COMMIT/`` with
links into ``blobs/``). Each run is a subprocess, so ``HF_HUB_CACHE``/``HF_HUB_OFFLINE`` are read as a user's shell
sets them; nothing touches the network.
"""

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_ckpt.hub import hub_id  # noqa: E402
from lora_ckpt.errors import CheckpointFileError  # noqa: E402
from lora_ckpt.testing import make_tokens  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENS = make_tokens(seed=5, batch=2, length=8)


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, activation_function="gelu")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _cache(root: Path, repo: str, folder: Path) -> None:
    """Put the files of ``folder`` into a Hub cache at ``root`` as the snapshot of ``repo``'s main branch."""
    storage = root / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    snap, blobs = storage / "snapshots" / COMMIT, storage / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))


@pytest.fixture
def hub(tmp_path):
    """A base GPT-2 folder in an offline Hub cache as ``tiny-org/gpt2``, and a PEFT adapter folder naming it."""
    base = _gpt2()
    base.save_pretrained(tmp_path / "base-folder")
    _cache(tmp_path / "cache", "tiny-org/gpt2", tmp_path / "base-folder")
    with warnings.catch_warnings():  # the peers' own deprecation warnings
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                             fan_in_fan_out=True))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            expected = model(TOKENS).logits
        model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-org/gpt2"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path, expected


def _run(tmp_path, *args, offline=True, extra=""):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    code = f"{extra}import sys; from lora_ckpt.cli import run; sys.argv = ['lora-ckpt', *{list(args)!r}]; run()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)


def _merged_logits(folder):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()(TOKENS).logits


def test_hub_id_rules(tmp_path, monkeypatch):
    assert hub_id("hf://org/name") == ("org/name", None)
    assert hub_id("hf://org/name@v1.0") == ("org/name", "v1.0")
    assert hub_id("org/name") == ("org/name", None)
    assert hub_id("runs/model.safetensors") is None  # a checkpoint file name is never a repo
    assert hub_id("./org/name") is None and hub_id("/org/name") is None and hub_id("name") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_id("org/name") is None  # what exists here is the local path
    with pytest.raises(CheckpointFileError, match=r"hf://org: not a Hub repo; write hf://ORG/NAME or hf://ORG/NAME@REVISION"):
        hub_id("hf://org")
    for walk in ("hf://org/name@../../../outside/ref", "hf://org/name@../refs/main", "hf://org/name@/etc",
                 "hf://org/name@a//b", "hf://org/a..b"):  # nothing may walk out of the cache
        with pytest.raises(CheckpointFileError, match=r"not a Hub repo; .* no '.', '..' or empty path segments"):
            hub_id(walk)
    assert hub_id("org/name@../x") is None  # a bare name that could walk is a local path (then: no such file)
    (tmp_path / "runs").mkdir()
    assert hub_id("runs/finl") is None  # a mistyped path under an existing folder is not a Hub id


def test_merge_adapter_alone_uses_its_base_from_the_hub_cache(hub):
    tmp_path, expected = hub
    res = _run(tmp_path, "merge", "adapter", "merged")
    assert res.returncode == 0, res.stderr
    assert "base: tiny-org/gpt2 (the adapter's base_model_name_or_path)" in res.stdout
    torch.testing.assert_close(_merged_logits(tmp_path / "merged"), expected, rtol=1e-5, atol=1e-5)
    # the cache is an input: its files are unchanged, nothing was written into it
    snap = tmp_path / "cache" / "models--tiny-org--gpt2" / "snapshots" / COMMIT
    assert sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in (tmp_path / "base-folder").iterdir())


@pytest.mark.parametrize("name", ["hf://tiny-org/gpt2", "tiny-org/gpt2", f"hf://tiny-org/gpt2@{COMMIT}"])
def test_hub_ids_as_base_and_for_inspect(hub, name):
    tmp_path, expected = hub
    res = _run(tmp_path, "merge", name, "adapter", "out.safetensors")
    assert res.returncode == 0, res.stderr
    assert "hf:/tiny" not in res.stdout + res.stderr  # the URL is never mangled into a path
    if name != "tiny-org/gpt2":
        return
    res = _run(tmp_path, "inspect", name, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["layout"] == "standard"


def test_python_loaders_take_hub_ids(hub):
    tmp_path, _ = hub
    code = ("from lora_ckpt import load_checkpoint, merge_adapter; "
            "c = load_checkpoint('hf://tiny-org/gpt2'); m = merge_adapter('tiny-org/gpt2', 'adapter'); "
            "print(len(c.state_dict), len(m))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    n, m = map(int, res.stdout.split())
    assert n > 0 and m == n


def test_offline_and_not_cached_says_how(hub):
    tmp_path, _ = hub
    res = _run(tmp_path, "inspect", "tiny-org/other")
    assert res.returncode == 1
    assert res.stderr.startswith("lora-ckpt: error: tiny-org/other: no such file or folder here, and not in the "
                                 "Hugging Face cache (")
    assert "while HF_HUB_OFFLINE is set; download it once with network access (hf download tiny-org/other)" in res.stderr


def test_without_huggingface_hub_the_extra_is_named(hub):
    tmp_path, _ = hub
    res = _run(tmp_path, "inspect", "tiny-org/gpt2", extra="import sys; sys.modules['huggingface_hub'] = None; ")
    assert res.returncode == 1
    assert ("tiny-org/gpt2: no such file or folder here, and reading Hugging Face Hub repos needs the hub extra: "
            "pip install 'lora-ckpt[hub]'") in res.stderr


def test_an_adapter_that_names_no_base(hub):
    tmp_path, _ = hub
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = None
    path.write_text(json.dumps(config))
    res = _run(tmp_path, "merge", "adapter", "merged")
    assert res.returncode == 1
    assert ("adapter_config.json: names no base_model_name_or_path, so the adapter alone cannot be merged; give the "
            "base model too: lora-ckpt merge BASE ADAPTER DST") in res.stderr
    assert not (tmp_path / "merged").exists()
