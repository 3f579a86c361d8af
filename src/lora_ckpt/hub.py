"""Hugging Face Hub inputs: a repo id (``org/name``) or an ``hf://org/name[@revision]`` URL, read through the cache.

:func:`local_path` is the one place an input name may become a Hub download. It is called by
:meth:`lora_ckpt.source.Source.open`, so every command and loader takes Hub ids the same way. A name that
exists on disk is always the local path; a bare ``org/name`` is a Hub id only where no such file or folder
exists and it does not end like a checkpoint file. Downloads go through ``huggingface_hub`` (the optional
``[hub]`` extra) into its cache and honour ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``; only the files a model
or adapter folder needs are fetched (configs, safetensors, tokenizer files), never ``.bin`` pickles where
safetensors exist.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from lora_ckpt.errors import CheckpointFileError
from lora_ckpt.output import PathLike

__all__ = ["HubId", "hub_id", "local_path"]

PREFIX = "hf://"
# the files a model or adapter folder needs; pickles only for repos that have no safetensors
_WANTED = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
_PICKLED = ["*.json", "*.bin", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
_REPO = re.compile(rf"({_NAME}/{_NAME})(?:@([A-Za-z0-9_./-]{{1,255}}))?")
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json")


class HubId(NamedTuple):
    """A Hub repo id and an optional revision (branch, tag or commit)."""

    repo: str
    revision: str | None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def hub_id(path: PathLike) -> HubId | None:
    """The Hub repo that ``path`` names, or None for a local path.

    ``hf://org/name[@revision]`` always names the Hub; ``org/name[@revision]`` does only where nothing by that
    name exists here and it does not end in a checkpoint suffix (``.safetensors``, ``.pt``, ``.json``, ...).

    Raises:
        CheckpointFileError: an ``hf://`` URL that is not ``hf://ORG/NAME[@REVISION]``.

    >>> hub_id("hf://gpt2-org/tiny@main")
    HubId(repo='gpt2-org/tiny', revision='main')
    >>> hub_id("runs/out.safetensors") is None
    True
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        return None
    if text.startswith(PREFIX):
        m = _REPO.fullmatch(text[len(PREFIX):])
        if m is None or not _plain(m[1], m[2]):
            raise CheckpointFileError(f"{text}: not a Hub repo; write hf://ORG/NAME or hf://ORG/NAME@REVISION (a "
                                      "branch, tag or commit: no '.', '..' or empty path segments)")
        return HubId(m[1], m[2])
    m = _REPO.fullmatch(text)
    if (m is None or not _plain(m[1], m[2]) or os.path.lexists(text) or text.lower().endswith(_FILE_SUFFIXES)
            or os.path.isdir(text.split("/", 1)[0])):  # ORG is a folder here: a mistyped local path
        return None
    return HubId(m[1], m[2])


def _plain(repo: str, revision: str | None) -> bool:
    """No ``..`` in the name and no ``.``/``..``/empty segment in the revision: nothing that walks the cache."""
    return ".." not in repo and (revision is None or all(p not in ("", ".", "..") for p in revision.split("/")))


def local_path(path: PathLike) -> Path:
    """Return ``path`` itself, or for a Hub repo id its snapshot folder in the Hugging Face cache (downloaded if needed).

    Raises:
        CheckpointFileError: a Hub id while ``huggingface_hub`` is not installed; a repo not in the cache while
            offline (``HF_HUB_OFFLINE=1``) or the Hub is unreachable; a repo or revision the Hub does not have.
    """
    spec = hub_id(path)
    if spec is None:
        return Path(path)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise CheckpointFileError(
            f"{os.fspath(path)}: no such file or folder here, and reading Hugging Face Hub repos needs the hub "
            "extra: pip install 'lora-ckpt[hub]'"
        ) from None
    try:
        folder = Path(huggingface_hub.snapshot_download(spec.repo, revision=spec.revision, allow_patterns=_WANTED))
        if not any(folder.glob("*.safetensors")) and not (folder / "adapter_config.json").is_file() and any(
            name.endswith(".bin") for name in _listing(huggingface_hub, spec)
        ):
            folder = Path(huggingface_hub.snapshot_download(spec.repo, revision=spec.revision,
                                                            allow_patterns=_PICKLED))
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as e:
        raise CheckpointFileError(f"{spec}: no such file or folder here, and the Hub has no such repo or revision "
                                  f"({type(e).__name__})") from None
    except hub_errors.LocalEntryNotFoundError:
        offline = "HF_HUB_OFFLINE is set" if _offline(huggingface_hub) else "the Hub cannot be reached"
        raise CheckpointFileError(
            f"{spec}: no such file or folder here, and not in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) while {offline}; "
            f"download it once with network access (hf download {spec.repo}) or give a local folder"
        ) from None
    except hub_errors.HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFileError(f"{spec}: the Hub refused it: {first}") from None
    return folder


def _offline(huggingface_hub: object) -> bool:
    return bool(getattr(getattr(huggingface_hub, "constants", None), "HF_HUB_OFFLINE", False))


def _listing(huggingface_hub: object, spec: HubId) -> list[str]:
    """The repo's file names, or none where the Hub cannot be asked (offline: the cache decides alone)."""
    if _offline(huggingface_hub):
        return []
    try:
        return list(huggingface_hub.list_repo_files(spec.repo, revision=spec.revision))  # type: ignore[attr-defined]
    except (OSError, ValueError):  # the Hub's errors derive from these: no listing, no pickle fallback
        return []
