"""Where lora_ckpt may write, and how: the one owner of every output path.

An :class:`Output` is checked once, when it is made, and every writer goes through it:

- **containment**: an output may not be, contain or lie inside any of the command's inputs (after
  resolving symbolic links), whatever ``overwrite`` says;
- **overwrite** (``--force``): without it an existing path is an error; with it only a plain file, or a
  folder holding nothing but the files a model or adapter folder holds, is replaced (anything else is
  refused, naming what is in the way); symbolic links are never followed or replaced;
- **atomic install**: content is written under a staging name beside the target and moved into place
  once complete, with no moment where both the old and the new output are gone; a new output is
  created without clobbering (of two concurrent writers, exactly one wins);
- **permissions**: new files and folders get the usual modes under the umask; a replaced output keeps
  its mode;
- **leftovers**: staging names carry the writer's process id, so a later run removes those of a run
  that was killed (and puts back an old output that was moved aside), and reports what it did;
- **pairs**: :func:`write_together` installs several outputs both-or-neither.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from lora_ckpt.errors import CheckpointFileError

__all__ = ["FILE_SUFFIXES", "REPLACEABLE", "Output", "PathLike", "clean_leftovers", "installed", "umask",
           "write_together"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: The suffixes of checkpoint files; any other output name is a folder.
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

#: What a model or adapter folder written by lora_ckpt, transformers or PEFT holds; ``overwrite`` replaces
#: a folder only when every entry matches one of these (and none is a folder or a link).
REPLACEABLE = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "adapter_model.bin", "adapter_config.json", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken",
    "spiece.model", "sentencepiece*.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "training_args.bin", "README.md",
    ".metadata", "__*_*.distcp",  # a torch.distributed.checkpoint directory
)

_STAGING = re.compile(r"^\.(?P<name>.+)\.lora-ckpt-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|old)$")


@dataclass(frozen=True)
class Output:
    """An output path checked once: where it goes, whether it may replace what is there, and its kind.

    Make one with :meth:`prepare`; write through :meth:`writing` (or :func:`write_together` for pairs).
    ``folder`` is True for a model or adapter folder, False for a checkpoint file.
    """

    path: Path
    folder: bool
    overwrite: bool = False
    removed: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def prepare(
        cls,
        path: PathLike,
        *,
        overwrite: bool = False,
        folder: bool | None = None,
        inputs: Iterable[PathLike | None] = (),
        siblings: Iterable[PathLike | None] = (),
        exists_hint: str = "",
    ) -> Output:
        """Return the checked output for ``path``; nothing is written yet.

        ``exists_hint``: said (in parentheses) when ``path`` exists and ``overwrite`` is not given, where the
        command's other arguments may be what the user meant (``unmerge``'s ``--base``).

        ``folder`` defaults to whether the name lacks a checkpoint suffix (:data:`FILE_SUFFIXES`).
        ``siblings`` are the other outputs of the same command, which it may not be, hold or lie inside either.
        Leftovers of interrupted runs writing the same path are cleaned up here (see :func:`clean_leftovers`).

        Raises:
            CheckpointFileError: the folder it goes in is missing; it is, holds or lies inside an input;
                it exists and ``overwrite`` is False; or with ``overwrite``, what exists is not
                something lora_ckpt may replace (named).
        """
        p = Path(path)
        if p.name in ("", ".", "..") or Path(os.path.abspath(p)) == Path(os.path.abspath(p)).parent:
            raise CheckpointFileError(f"{p}: name a new file or folder for the output, not {str(p)!r}")
        is_folder = (p.suffix.lower() not in FILE_SUFFIXES) if folder is None else folder
        if folder is None and is_folder and p.suffix[1:].isalpha() and not str(path).endswith(("/", os.sep)):
            raise CheckpointFileError(  # out.txt, merged.safetensor: a mistyped file name, not a folder
                f"{path}: {p.suffix!r} is not a checkpoint suffix ({', '.join(FILE_SUFFIXES)}); for a model folder "
                "name it without a suffix, or end the name with '/'"
            )
        if not is_folder and str(path).endswith(("/", os.sep)):
            raise CheckpointFileError(f"{path}: names a folder (a trailing /) but the output is a file; drop the /")
        if folder and p.suffix.lower() in FILE_SUFFIXES:  # a PEFT adapter is a folder: x.safetensors/ would surprise
            raise CheckpointFileError(f"{path}: this output is a folder, and {p.suffix!r} names a file; give a folder "
                                      "name without a file suffix")
        parent = p.parent
        if not parent.is_dir():
            raise CheckpointFileError(f"{p}: the folder {parent} does not exist")
        inputs = [i for i in inputs if isinstance(i, (str, os.PathLike))]
        _check_containment(p, inputs, "the input", "lora-ckpt never writes over its inputs")
        _check_containment(p, siblings, "the other output", "a command's outputs are apart")
        removed = tuple(clean_leftovers(p, protect=[i for i in inputs if i is not None]))
        if os.path.lexists(p):
            if not overwrite:
                if is_folder != p.is_dir() and not p.is_symlink():  # --force would not help: say what does
                    what, want = ("a file", "a folder") if is_folder else ("a folder", "a file")
                    raise CheckpointFileError(f"{p}: already exists and is {what}, but this output is {want}; give "
                                              "another name")
                hint = (" (it holds a PEFT adapter: to merge one, give BASE ADAPTER DST)"
                        if folder is None and (p / "adapter_config.json").is_file() else
                        f" ({exists_hint})" if exists_hint else "")
                raise CheckpointFileError(f"{p}: already exists{hint}; pass overwrite=True (CLI: --force) to replace it")
            _check_replaceable(p, is_folder)
        return cls(p, is_folder, overwrite, removed)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """Yield the staging path to write (a new empty file, or a new empty folder); install it on success.

        On any failure (an interrupt too) the staging path is removed and the old output, if any, is untouched.
        """
        with write_together(self) as (staged,):
            yield staged


@contextlib.contextmanager
def write_together(*outputs: Output) -> Iterator[tuple[Path, ...]]:
    """Yield a staging path per output; install them all once the block succeeds, or none of them.

    An output that replaces an old one swaps with it; if a later one fails to install, the earlier ones
    are swapped back, so the old outputs return as they were.
    """
    staged: list[Path] = []
    try:
        for out in outputs:
            staged.append(_stage(out))
        yield tuple(staged)
        for path in staged:
            _sync_tree(path)
        with _signals_held():  # installing and clearing the old outputs runs to the end; a signal waits for it
            undo: list[tuple[Output, Path]] = []
            try:
                for out, path in zip(outputs, staged):
                    _install(out, path)
                    undo.append((out, path))
            except BaseException:
                for out, path in reversed(undo):
                    _uninstall(out, path)
                raise
            for out, path in undo:  # the old outputs (now under the staging names), or nothing
                _remove(path)
                _sync_dir(out.path.parent)
            _INSTALLED.extend(out.path for out in outputs)
    finally:
        for path in staged:
            _unlock(path)
            if os.path.lexists(path):
                _remove(path)


_INSTALLED: list[Path] = []  # every output this process installed, in order


def installed() -> tuple[Path, ...]:
    """Every output this process has installed so far (so a caller interrupted afterwards can tell it finished)."""
    return tuple(_INSTALLED)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread for the block (where the platform can); deliver them after."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def clean_leftovers(target: Path, *, protect: Iterable[PathLike] = ()) -> list[str]:
    """Clean up what runs that were killed left beside ``target``; return one line per thing done.

    A staging file or folder (``.tmp``) of a run that is gone (its process is not alive here and its lock is
    free, so a run in another container or on another host is left alone) is deleted. An old output moved
    aside (``.old``, where the swap is not atomic on this system) is put back if nothing took its place, and
    otherwise only reported. Nothing in ``protect`` (the command's inputs) is ever touched.
    """
    done: list[str] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return done
    kept = {Path(p).resolve() for p in protect}
    for entry in entries:
        m = _STAGING.match(entry.name)
        if m is None or m.group("name") != target.name or _alive(int(m.group("pid"))):
            continue
        path = Path(entry.path)
        if path.resolve() in kept or _locked(path):
            continue
        if m.group("kind") == "tmp":
            _remove(path)
            done.append(f"removed {path.name}, left by an interrupted run (pid {m.group('pid')})")
        elif not os.path.lexists(target):
            os.rename(path, target)
            done.append(f"put back {target}, moved aside by an interrupted run (pid {m.group('pid')})")
        else:
            done.append(f"{path.name} beside {target.name} is an older output an interrupted run (pid "
                        f"{m.group('pid')}) moved aside; remove it if you do not need it")
    for line in done:
        log.warning("%s", line)
    return done


_LOCKS: dict[Path, int] = {}  # staging path -> the open descriptor holding its lock, while this process writes it


def _lock(path: Path) -> None:
    """Hold an exclusive lock on the staging path while writing it, so no other run takes it for a leftover."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    _LOCKS[path] = fd


def _unlock(path: Path) -> None:
    fd = _LOCKS.pop(path, None)
    if fd is not None:
        os.close(fd)


def _locked(path: Path) -> bool:
    """Whether another run holds the staging path's lock (it is still writing it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _check_containment(out: Path, inputs: Iterable[PathLike | None], what: str, rule: str) -> None:
    target = out.resolve()
    for given in inputs:
        if given is None or not isinstance(given, (str, os.PathLike)):
            continue
        inp = Path(given).resolve()
        if target == inp:
            how = "is"
        elif inp in target.parents:
            how = "lies inside"
        elif target in inp.parents:
            how = "contains"
        else:
            continue
        raise CheckpointFileError(f"{out}: the output {how} {what} {given}; {rule}: choose an output path outside them")


def _check_replaceable(p: Path, folder: bool) -> None:
    if p.is_symlink():
        raise CheckpointFileError(
            f"{p}: is a symbolic link (to {os.readlink(p)}); lora-ckpt replaces only plain files and folders: "
            "name the link's target itself, or remove the link"
        )
    st = p.lstat()
    if folder and not stat.S_ISDIR(st.st_mode):
        raise CheckpointFileError(f"{p}: exists and is not a folder; the output is a folder: remove it or choose another name")
    if not folder and stat.S_ISDIR(st.st_mode):
        raise CheckpointFileError(
            f"{p}: is a folder, and the output is a file; remove the folder or choose another name"
        )
    if not folder and not stat.S_ISREG(st.st_mode):
        raise CheckpointFileError(f"{p}: is not a regular file; lora-ckpt replaces only regular files")
    if folder:
        foreign = sorted(
            e.name + ("/" if e.is_dir(follow_symlinks=False) else " (a link)" if e.is_symlink() else
                      "" if e.is_file(follow_symlinks=False) else " (not a regular file)")
            for e in os.scandir(p)
            if not e.is_file(follow_symlinks=False) or not _replaceable_name(e.name)
        )
        if foreign:
            listed = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
            raise CheckpointFileError(
                f"{p}: holds {listed}, which a model or adapter folder does not; lora-ckpt replaces only what a "
                "model save wrote: choose a new output path or remove them yourself"
            )


def _replaceable_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in REPLACEABLE)


def _stage(out: Output) -> Path:
    """Create the empty staging file or folder beside the output, named so a later run can tell it is ours."""
    while True:
        path = out.path.with_name(f".{out.path.name}.lora-ckpt-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            if out.folder:
                os.mkdir(path, 0o777)  # the umask applies, as for any new folder
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        _lock(path)
        return path


def _install(out: Output, staged: Path) -> None:
    """Move ``staged`` to the output path: no clobbering when it is new, a swap with the old one otherwise.

    After a swap the old output sits at ``staged`` (removed by the caller once every output is in place).
    """
    if out.overwrite and os.path.lexists(out.path):
        os.chmod(staged, stat.S_IMODE(out.path.lstat().st_mode) & 0o777)  # a replaced output keeps its mode
        if _rename2(staged, out.path, _RENAME_EXCHANGE):
            return
        aside = staged.with_name(staged.name[: -len(".tmp")] + ".old")
        os.rename(out.path, aside)  # no swap on this system: the old one waits aside until the new is in place
        try:
            os.rename(staged, out.path)
        except BaseException:
            os.rename(aside, out.path)
            raise
        os.rename(aside, staged)
        return
    if _rename2(staged, out.path, _RENAME_NOREPLACE):
        return
    if os.path.lexists(out.path):
        raise CheckpointFileError(f"{out.path}: appeared while this run was writing it (another run?); nothing replaced")
    os.rename(staged, out.path)


def _uninstall(out: Output, staged: Path) -> None:
    """Undo :func:`_install`: the old output back in place, or the new one taken out."""
    if os.path.lexists(staged):  # swapped: the old one is at staged
        if not _rename2(staged, out.path, _RENAME_EXCHANGE):
            new_aside = staged.with_name(staged.name[: -len(".tmp")] + ".new")
            os.rename(out.path, new_aside)
            os.rename(staged, out.path)
            os.rename(new_aside, staged)
    else:
        os.rename(out.path, staged)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_libc: ctypes.CDLL | None = None


def _rename2(src: Path, dst: Path, flag: int) -> bool:
    """``renameat2`` with ``flag`` (Linux): True if done, False where the system cannot; raises on real errors."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    if err == errno.EEXIST:
        raise CheckpointFileError(f"{dst}: appeared while this run was writing it (another run?); nothing replaced")
    raise OSError(err, os.strerror(err), str(dst))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _sync_tree(path: Path) -> None:
    """fsync a staged file, or every file of a staged folder, so the rename publishes complete data; new
    files get the mode the umask gives (some writers, safetensors' among them, create theirs 0600)."""
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    mask = umask()
    for f in files:
        os.chmod(f, 0o666 & ~mask)
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        _sync_dir(path)


def umask() -> int:
    """This process's umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read by setting, and put back at once
    os.umask(mask)
    return mask


def _sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
