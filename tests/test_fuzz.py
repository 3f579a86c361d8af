"""A fast seeded sample of the fuzz campaign in fuzz/fuzz_parsers.py: hostile input raises only lora_ckpt's errors.

The campaign itself (``python fuzz/fuzz_parsers.py``, 10,000 inputs per format) is a script; this runs the same
mutators on a few dozen inputs per format, so a parser change that lets a KeyError, a RecursionError or a hang
through is caught by the suite. Warnings are errors here as everywhere in the suite; the one torch warning the
campaign ignores is explained in ``fuzz_parsers.parse_warnings``.
"""

import random
import sys
from pathlib import Path

import pytest

from lora_ckpt import CheckpointFileError, UnsafeCheckpointError, load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import fuzz_parsers  # noqa: E402

PER_FORMAT = 40  # 7 formats: 280 inputs, a few seconds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzz_parsers.prepare(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("name", list(fuzz_parsers.FORMATS))
def test_hostile_inputs_raise_only_typed_errors(seeds, name):
    result = fuzz_parsers.run_format(name, seeds, count=PER_FORMAT, seed=0, timeout=20)
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
