"""The docs are executed: README and docs/*.md code blocks, docstring examples, and the API list."""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import lora_ckpt

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = _python_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python code blocks")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)


def test_guide_and_api_pages_have_examples():
    assert len(_python_blocks(ROOT / "docs" / "guide.md")) >= 8
    assert _python_blocks(ROOT / "docs" / "api.md")


def _modules():
    return [m.name for m in pkgutil.walk_packages(lora_ckpt.__path__, "lora_ckpt.") if not m.name.endswith(".plugin")]


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_docstring_examples_exist():
    total = sum(doctest.testmod(importlib.import_module(n), report=False).attempted for n in _modules())
    assert total >= 6


def test_all_matches_the_api_reference():
    documented = set(re.findall(r"^### `(\w+)`", (ROOT / "docs" / "api.md").read_text(), flags=re.MULTILINE))
    exported = set(lora_ckpt.__all__) - {"__version__"}
    assert documented == exported
    assert all(hasattr(lora_ckpt, name) for name in lora_ckpt.__all__)


def test_public_functions_have_docstrings_and_hints():
    import inspect

    for name in lora_ckpt.__all__:
        obj = getattr(lora_ckpt, name)
        if inspect.isfunction(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name
            assert "return" in inspect.get_annotations(obj), name
