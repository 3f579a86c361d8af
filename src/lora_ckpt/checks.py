"""The one validation of every number and pattern that decides a merge, wherever it comes from.

An alpha or rank from an argument, a PEFT config, a kohya ``.alpha`` tensor, nanoGPT's ``model_args`` or
lora_ckpt's own metadata goes through :func:`check_alpha` / :func:`check_rank`, so a NaN, a ``true``, an
``8.7`` or a string is refused the same way everywhere, naming where it came from and how to settle it.
User-supplied regular expressions (PEFT's ``target_modules``, ``rank_pattern`` …) are matched through
:class:`Patterns`, which refuses patterns that could run away and bounds the time spent matching.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from lora_ckpt.errors import AlphaError, LayoutError, brief

__all__ = ["MATCH_SECONDS", "Patterns", "check_alpha", "check_rank", "unique_keys"]

#: The most seconds spent matching one config's patterns against every module name.
MATCH_SECONDS = 2.0

# A quantified group whose body is itself quantified, such as (.*)*, (a+)+ or (\w+\s?)*: exponential backtracking.
_NESTED = re.compile(r"\((?:[^()\\]|\\.)*(?:[*+}]|\{\d*,\d*\})(?:[^()\\]|\\.)*\)(?:[*+]|\{\d*,?\d*\})")

T = TypeVar("T")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook`` that refuses a key given twice (JSON itself keeps the last silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {brief(k)} appears twice")
        out[k] = v
    return out


def check_alpha(value: object, *, where: str, fix: str) -> float:
    """Return ``value`` as a float if it is a finite real number (not a bool, not a string); raise otherwise.

    ``where`` names the source (e.g. ``"adapter_config.json: lora_alpha"``), ``fix`` the argument or flag
    that settles it. Large values are accepted here; a merge whose result overflows is refused there.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AlphaError(f"{where} is {brief(value)}, not a number; {fix}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        raise AlphaError(f"{where} is {brief(value)}, too large for a float; {fix}") from None
    if not finite:
        raise AlphaError(f"{where} is {brief(value)}, not a finite number; {fix}")
    return float(value)


def check_rank(value: object, *, where: str) -> int:
    """Return ``value`` if it is a positive integer (``8`` or ``8.0``, not ``8.7``, ``True`` or ``"8"``); raise otherwise."""
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))  # no float(10**400)
    if isinstance(value, bool) or not finite:
        raise AlphaError(f"{where} is {brief(value)}, not a positive integer rank")
    assert isinstance(value, (int, float))
    if value != int(value) or value <= 0:  # 8.0 is the rank 8; 8.7 is no rank
        raise AlphaError(f"{where} is {brief(value)}, not a positive integer rank")
    return int(value)


class Patterns:
    """Regular expressions from a config, matched against module names with bounded effort.

    A pattern that cannot compile, or whose shape makes backtracking exponential (a quantified group
    whose body is quantified, e.g. ``(.*)*``), is refused by name; matching as a whole stops after
    :data:`MATCH_SECONDS` where the platform allows a timer (the main thread on POSIX).
    """

    def __init__(self, field: str, patterns: list[str], *, where: str) -> None:
        self.field, self.where = field, where
        self.compiled: dict[str, re.Pattern[str]] = {}
        for p in patterns:
            if not isinstance(p, str):
                raise LayoutError(f"{where}: {field} holds {brief(p)}, not a pattern string")
            if _NESTED.search(p):
                raise LayoutError(
                    f"{where}: the {field} pattern {brief(p)} nests quantifiers and can take exponential time to "
                    "match; "
                    "rewrite it without a repeated group of repeats (e.g. '.*' instead of '(.*)*')"
                )
            try:
                self.compiled[p] = re.compile(p)
            except (re.error, OverflowError, RecursionError) as e:  # a repeat count past 2**32, 1000 nested groups
                raise LayoutError(
                    f"{where}: the {field} pattern {brief(p)} is not a valid regular expression ({e})"
                ) from None

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (which matches these or other patterns) under the time bound; nested runs share one bound."""
        with _time_limit(MATCH_SECONDS):
            try:
                return fn()
            except _RunAway:
                field, pattern = _MATCHING[0]
                raise LayoutError(
                    f"{self.where}: matching the {field} pattern {brief(pattern)} took over {MATCH_SECONDS:g} s; "
                    "simplify the pattern"
                ) from None

    @property
    def current(self) -> str:
        return _MATCHING[0][1]

    @current.setter
    def current(self, pattern: str) -> None:
        _MATCHING[0] = (self.field, pattern)  # what a runaway match is reported as, wherever the bound was set

    def fullmatch(self, pattern: str, name: str) -> bool:
        self.current = pattern
        try:
            return self.compiled[pattern].fullmatch(name) is not None
        except (re.error, RecursionError) as e:
            raise LayoutError(f"{self.where}: the {self.field} pattern {brief(pattern)} cannot be matched ({e})") from None

    def suffixes(self, name: str) -> list[str]:
        """Every pattern that matches the end of ``name`` at a component boundary (PEFT's rule), in order."""
        out: list[str] = []
        while (found := self.suffix(name, skip=len(out) and out[-1])) is not None:
            out.append(found)
        return out

    def suffix(self, name: str, *, skip: str | int = 0) -> str | None:
        """The first pattern (in order, after ``skip``) that matches the end of ``name`` at a component boundary."""
        patterns = list(self.compiled)
        start = patterns.index(skip) + 1 if isinstance(skip, str) and skip in self.compiled else 0
        for p in patterns[start:]:
            self.current = p
            try:
                found = re.match(rf"(.*\.)?({p})$", name)
            except (re.error, RecursionError) as e:  # inline flags (?i): valid alone, not inside PEFT's wrapping
                raise LayoutError(
                    f"{self.where}: the {self.field} pattern {brief(p)} cannot be matched as PEFT matches patterns, "
                    f"inside (.*\\.)?(...)$ ({e})"
                ) from None
            if found:
                return p
        return None


class _RunAway(Exception):
    pass


_MATCHING: list[tuple[str, str]] = [("", "")]  # (field, pattern) being matched now, for the runaway message


def _alarm(signum: int, frame: object) -> None:
    raise _RunAway()


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_RunAway` in the block after ``seconds`` (SIGALRM), where that is possible and harmless:
    the main thread on POSIX, no bound already running, and no alarm of the application's own pending."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0 or signal.getsignal(signal.SIGALRM) is _alarm):
        yield
        return

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
