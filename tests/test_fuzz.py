"""A fast seeded sample of the fuzz campaign in fuzz/fuzz_parsers.py: hostile input raises only lora_ckpt's errors.

The campaign itself (``python fuzz/fuzz_parsers.py``, 10,000 inputs per format) is a script; this runs the same
mutators on a few dozen inputs per format, so a parser change that lets a KeyError, a RecursionError or a hang
through is caught by the suite. Warnings are errors here as everywhere in the suite; the one torch warning the
campaign ignores is explained in ``fuzz_parsers.parse_warnings``.
"""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from lora_ckpt import (
    AlphaError,
    CheckpointFileError,
    LayoutError,
    UnsafeCheckpointError,
    detect_layout,
    load_checkpoint,
)
from lora_ckpt.checkpoint import checkpoint_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import fuzz_parsers  # noqa: E402

PER_FORMAT = 30  # 7 formats: 210 inputs (and 110 exploit pickles below), a few seconds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzz_parsers.prepare(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("name", list(fuzz_parsers.FORMATS))
def test_hostile_inputs_raise_only_typed_errors(seeds, name):
    result = fuzz_parsers.run_format(name, seeds, count=PER_FORMAT, seed=0, timeout=20)
    assert not result.unmade, result.unmade[0]  # the fuzzer made every input
    assert result.tried == PER_FORMAT
    assert result.failed == 0, fuzz_parsers.report_failures([result], shown=10)
    # the sample reaches both sides of the parser: some inputs are refused, some still parse
    assert result.typed > 0 and result.accepted > 0


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickles_that_would_run_code_are_refused_and_run_nothing(seeds, tmp_path, zip_format):
    fmt = fuzz_parsers.PtZipFormat(seeds) if zip_format else fuzz_parsers.LegacyPickleFormat(seeds)
    for what, payload in fuzz_parsers.exploit_pickles(seeds.canary):
        path = tmp_path / "evil.pt"
        path.write_bytes(fmt.with_main_pickle(seeds.pt_objects["lora"], payload, random.Random(what)))
        with fuzz_parsers.parse_warnings(), pytest.raises(CheckpointFileError) as caught:
            load_checkpoint(path)
        assert not seeds.canary.exists(), what
        if what.startswith("GLOBAL "):  # the others use opcodes torch's unpickler does not read at all: "corrupt"
            assert isinstance(caught.value, UnsafeCheckpointError), (what, str(caught.value))


# --- what the campaign found: each input below once escaped as another exception; now it is one clear line ------


def _safetensors(path, header: str, data: bytes = b"") -> Path:
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header, message", [
    ('{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',  # was TypeError: unhashable type: 'list'
     r"corrupt safetensors header \(a: dtype \['F32'\] is not one lora_ckpt reads\)"),
    ('{"a": {"dtype": "F32", "shape": [0, 1180591620717411303424], "data_offsets": [0, 0]}}',  # was a torch TypeError
     r"corrupt safetensors header \(a: shape \[0, 1180591620717411303424\] is too large for a tensor\)"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"lora_ckpt": "'
     + "[" * 100_000 + "]" * 100_000 + '"}}',  # was RecursionError
     r"lora_ckpt metadata is not valid JSON \(maximum recursion depth exceeded"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"lora_ckpt": '
     '"{\\"alpha\\": {\\"m\\": 1' + "0" * 400 + '}}"}}',  # was OverflowError: int too large to convert to float
     r"lora_ckpt metadata alpha of 'm' is 100000000000000000...0000000000000000000, not a finite number"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"lora_ckpt": '
     '"{\\"aliases\\": {\\"b\\": [\\"a\\"]}}"}}',  # was TypeError: unhashable type: 'list'
     r"lora_ckpt metadata aliases is not an object of key -> key; the file is corrupt or was edited$"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"lora_ckpt": '
     '"{\\"format_version\\": \\"' + "x" * 10_000 + '\\"}"}}',  # was a 10,000-character message
     r"lora_ckpt metadata format_version 'x{37}\.\.\.x{38}' is not a positive integer"),
])
def test_hostile_safetensors_headers(tmp_path, header, message):
    path = _safetensors(tmp_path / "m.safetensors", header, bytes(4))
    with pytest.raises(CheckpointFileError, match=message) as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_hostile_shard_names_in_an_index(tmp_path):
    from lora_ckpt.testing.llama import LlamaShape, write_llama_checkpoint

    folder = write_llama_checkpoint(tmp_path / "m", LlamaShape(hidden=32, intermediate=64, layers=1, vocab=64),
                                    dtype=torch.float32, shard_bytes=20000)
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    (folder / "loop").symlink_to("loop")
    for name, message in [
        ("loop", r"shard 'loop' cannot be resolved \(Symlink loop from .*\); refusing to read it"),  # was RuntimeError
        ("x" * 300, r"names shard\(s\) \['x{37}\.\.\.x{38}'\] that are not in"),  # was OSError: File name too long
    ]:
        index.write_text(json.dumps({"weight_map": {k: name for k in weight_map}}))
        with pytest.raises(CheckpointFileError, match=message):
            load_checkpoint(folder)


def test_hostile_checkpoint_dicts():
    deep: object = 0
    for _ in range(100_000):
        deep = (deep,)
    with pytest.raises(LayoutError, match=r"no state dict found: .*found keys \['\(\(\(\(\.\.\.\),\),\),\)'\]"):
        checkpoint_from_dict({deep: 1}, None)  # was RecursionError
    sd = {"w": torch.zeros(2, 2)}
    with pytest.raises(AlphaError, match=r"model_args\['lora_alpha'\] is 100000000000000000\.\.\.0000000000000000000, "
                                         "not a finite number"):
        checkpoint_from_dict({"model": sd, "model_args": {"lora_alpha": 10**400}}, None)  # was OverflowError
    with pytest.raises(CheckpointFileError, match=r"x.pt: lora_ckpt metadata tied is not a list of key lists"):
        checkpoint_from_dict({"model": sd, "lora_ckpt": {"tied": torch.zeros(3)}}, Path("x.pt"))  # was RuntimeError
    with pytest.raises(LayoutError, match=r"x.pt: keys \['w'\] hold sparse or nested tensors; lora_ckpt reads dense "
                                          r"tensors only \(convert sparse ones with .to_dense\(\)\)"):
        checkpoint_from_dict({"model": {"w": torch.eye(2).to_sparse()}}, Path("x.pt"))  # was NotImplementedError
    with pytest.raises(LayoutError, match=r"^keys \['w'\] hold sparse or nested tensors"):
        detect_layout({"w": torch.eye(2).to_sparse()})


@pytest.mark.parametrize("field, value, error, message", [
    ("lora_alpha", 10**400, AlphaError, r"lora_alpha is 100000000000000000\.\.\.0000000000000000000, too large for a "
                                        "float"),  # was OverflowError
    ("rank_pattern", {"(" * 2000 + ")" * 2000: 2}, LayoutError,
     r"the rank_pattern pattern '\(+\.\.\.\)+' is not a valid regular expression \(maximum recursion depth"),
    ("rank_pattern", {"q{99999999999}": 2}, LayoutError,  # was OverflowError
     r"the rank_pattern pattern 'q\{99999999999\}' is not a valid regular expression \(the repetition number"),
    ("rank_pattern", {"(?i)q_proj": 2}, LayoutError,  # was re.error, from PEFT's (.*\.)?(...)$ around it
     r"the rank_pattern pattern '\(\?i\)q_proj' cannot be matched as PEFT matches patterns"),
])
def test_hostile_adapter_configs(tmp_path, field, value, error, message):
    from lora_ckpt.formats.peft import load_peft_adapter
    from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter

    folder = write_llama_adapter(tmp_path / "a", LlamaShape(hidden=32, intermediate=64, layers=1, vocab=64), rank=2)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(error, match=message):
        load_peft_adapter(folder)
