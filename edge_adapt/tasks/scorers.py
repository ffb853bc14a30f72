"""Scorers: does a model's reply match a reference answer?

A scorer is a small frozen object with two methods: `extract(text)` (the answer a reply commits to, normalised, or
None) and `correct(text, reference)`. Votes group replies by `extract`; accuracy uses `correct`.

Spec strings (`resolve_scorer`): "final-number" (GSM8K-style), "stated-number" (the task families'), "exact",
"regex:<pattern>", or "module:function" for a custom Python function `(text, reference) -> bool`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Protocol

from edge_adapt.errors import UsageError


class Scorer(Protocol):
    name: str

    def extract(self, text: str) -> str | None: ...

    def correct(self, text: str, reference: str) -> bool: ...


# A number: optional sign, thousands groups of exactly three digits or a plain run of digits, optional decimals.
_NUMBER = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(r"(?<![\w.])" + _NUMBER)
# "The answer is 72", "answer: $1,200", "Final answer is -3", "#### 72", "\boxed{72}": the clause after the marker.
_MARKER_RE = re.compile(r"answer\s*(?:is|=|:)\s*[:=]?|####|\\boxed\{", re.IGNORECASE)
# A clause ends at a line break or at a period that is not a decimal point.
_CLAUSE_END_RE = re.compile(r"\n|\.(?!\d)")


def normalize_number(raw: str) -> str | None:
    """'1,234.50' -> '1234.5', '−7' -> '-7', '$12' -> '12', '3.0' -> '3'; None when it is no number."""
    s = raw.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "").strip()
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d.is_zero():
        return "0"  # not "-0" or "0.00"
    # Exact at any length, from the digits: int() refuses more than 4,300 digits, quantize() and normalize() round
    # or raise past the context's 28.
    out = format(d, "f")
    return out.rstrip("0").rstrip(".") if "." in out else out


def _marked_number(clause: str) -> str | None:
    """The number a marked clause states: after its last '=' ("The answer is 8 + 5 = 13"), else its first."""
    if "=" in clause:
        clause = clause.rsplit("=", 1)[1]
    numbers = _NUMBER_RE.findall(clause)
    return normalize_number(numbers[0]) if numbers else None


def extract_final_number(text: str) -> str | None:
    """The number a reply commits to: the last 'answer is ...' / '#### ...' / '\\boxed{...}' clause that states
    one (after its last '=' if it has one), else the last number in the reply."""
    for m in reversed(list(_MARKER_RE.finditer(text))):
        rest = text[m.end() :]
        end = _CLAUSE_END_RE.search(rest)
        got = _marked_number(rest[: end.start()] if end else rest)
        if got is not None:
            return got
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def reference_number(reference: str) -> str | None:
    """A reference answer's number: GSM8K answers end with '#### N'; plain references are the number itself."""
    if "####" in reference:
        reference = reference.rsplit("####", 1)[1]
    return extract_final_number(reference)


@dataclass(frozen=True)
class FinalNumber:
    name: str = "final-number"

    def extract(self, text: str) -> str | None:
        return extract_final_number(text)

    def correct(self, text: str, reference: str) -> bool:
        got, want = extract_final_number(text), reference_number(reference)
        return got is not None and want is not None and Decimal(got) == Decimal(want)


# "... = 8", "There are 6 days from May 3 to May 9", "The next number is 16": a number stated as a result.
_STATED_RE = re.compile(r"(?:=|\b(?:is|are|was|were|equals|makes)\b)\s*(" + _NUMBER + r")(?![\w.]\d)", re.IGNORECASE)


def extract_stated_number(text: str) -> str | None:
    """The number a reply commits to when it restates the question after its answer ("There are 180 minutes
    in 3 hours"): the last 'answer is ...' clause that states one; else the last number stated as a result
    ("= N", "is N", "are N", "was N", "equals N", "makes N"); else the last number."""
    for m in reversed(list(_MARKER_RE.finditer(text))):
        rest = text[m.end() :]
        end = _CLAUSE_END_RE.search(rest)
        got = _marked_number(rest[: end.start()] if end else rest)
        if got is not None:
            return got
    stated = _STATED_RE.findall(text)
    if stated:
        return normalize_number(stated[-1])
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


@dataclass(frozen=True)
class StatedNumber:
    """FinalNumber for replies that restate the question after the answer: `extract_stated_number`. The generated
    families use it; arith keeps FinalNumber, which its labels and reports were made with."""

    name: str = "stated-number"

    def extract(self, text: str) -> str | None:
        return extract_stated_number(text)

    def correct(self, text: str, reference: str) -> bool:
        got, want = extract_stated_number(text), reference_number(reference)
        return got is not None and want is not None and Decimal(got) == Decimal(want)


def _norm_text(s: str) -> str:
    return " ".join(s.strip().lower().split()).rstrip(".!")


@dataclass(frozen=True)
class ExactMatch:
    """Case- and whitespace-insensitive equality of the whole reply, a trailing period ignored."""

    name: str = "exact"

    def extract(self, text: str) -> str | None:
        return _norm_text(text) or None

    def correct(self, text: str, reference: str) -> bool:
        return _norm_text(text) == _norm_text(reference)


@dataclass(frozen=True)
class RegexMatch:
    """The reply's last match of `pattern` (its first group if it has one) equals the reference, normalised."""

    pattern: str
    name: str = "regex"

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise UsageError(f"scorer regex {self.pattern!r} does not compile: {exc}") from None

    def extract(self, text: str) -> str | None:
        found = list(re.finditer(self.pattern, text))
        if not found:
            return None
        m = found[-1]
        return _norm_text(m.group(1) if m.groups() else m.group(0))

    def correct(self, text: str, reference: str) -> bool:
        got = self.extract(text)
        return got is not None and got == _norm_text(reference)


@dataclass(frozen=True)
class CustomScorer:
    """A user's `module:function(text, reference) -> bool`; votes group replies by their final number."""

    fn: Callable[[str, str], bool]
    name: str

    def extract(self, text: str) -> str | None:
        return extract_final_number(text) or _norm_text(text)

    def correct(self, text: str, reference: str) -> bool:
        # The user's code: whatever it raises (a bug in it, a signature that is not (text, reference)) is the
        # --scorer's fault, said in one line, not a traceback blamed on edge-adapt.
        try:
            return bool(self.fn(text, reference))
        except Exception as exc:
            why = " ".join(str(exc).split()) or "no message"
            raise UsageError(f"scorer {self.name!r} raised {type(exc).__name__} ({why:.200}) checking a reply; "
                             "it is called as function(text, reference) -> bool") from exc  # the chain: where in their code


def resolve_scorer(spec: str) -> Scorer:
    """A scorer from its spec string (see the module docstring)."""
    if spec in ("final-number", "number"):
        return FinalNumber()
    if spec == "stated-number":
        return StatedNumber()
    if spec == "exact":
        return ExactMatch()
    if spec.startswith("regex:"):
        return RegexMatch(spec[len("regex:") :], name=spec)
    module, sep, attr = spec.partition(":")
    if sep and module and attr:
        # As `python -m` would: a module in the current directory is found (a console script's path lacks it).
        here = os.getcwd()
        added = here not in sys.path
        if added:
            sys.path.insert(0, here)
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"scorer {spec!r} cannot be loaded: {exc}") from None
        finally:
            if added:
                sys.path.remove(here)
        if not callable(fn):
            raise UsageError(f"scorer {spec!r} is not callable")
        try:  # a signature that cannot take (text, reference) is known now, before any reply is sampled
            inspect.signature(fn).bind("text", "reference")
        except TypeError:
            takes = ", ".join(inspect.signature(fn).parameters)
            raise UsageError(f"scorer {spec!r} takes ({takes}), not (text, reference)") from None
        except ValueError:  # no signature to read (some builtins): CustomScorer.correct says what a call raises
            pass
        return CustomScorer(fn, spec)
    raise UsageError(f"unknown scorer {spec!r}: use final-number, stated-number, exact, regex:<pattern> or module:function")


WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WEEKDAY_RE = re.compile(r"\b(" + "|".join(WEEKDAYS) + r")\b", re.IGNORECASE)


def extract_weekday(text: str) -> str | None:
    """The weekday a reply commits to: the last one named in its last 'answer is ...' clause that names one, else
    the last one named anywhere ("Today is Monday, so tomorrow is Tuesday" -> Tuesday)."""
    for m in reversed(list(_MARKER_RE.finditer(text))):
        rest = text[m.end() :]
        end = _CLAUSE_END_RE.search(rest)
        found = _WEEKDAY_RE.findall(rest[: end.start()] if end else rest)
        if found:
            return found[-1].capitalize()
    found = _WEEKDAY_RE.findall(text)
    return found[-1].capitalize() if found else None


@dataclass(frozen=True)
class Weekday:
    """The reference is a weekday name; the reply's is `extract_weekday`'s, compared case-insensitively."""

    name: str = "weekday"

    def extract(self, text: str) -> str | None:
        return extract_weekday(text)

    def correct(self, text: str, reference: str) -> bool:
        got = extract_weekday(text)
        return got is not None and got.lower() == reference.strip().lower()
