"""Final-answer extractors for the vote strategies: text -> normalised answer, or None when absent."""

from __future__ import annotations

import re
from collections.abc import Callable

from edge_adapt.errors import UsageError

Extractor = Callable[[str], "str | None"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in the text, without thousands separators or trailing zeros: '1,200.50' -> '1200.5'."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    num = found[-1].replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    if num in ("-0", ""):
        num = "0"
    return num


def exact_text(text: str) -> str | None:
    """The whole text with whitespace collapsed; None when empty."""
    norm = " ".join(text.split())
    return norm or None


def regex(pattern: str) -> Extractor:
    """The last match of `pattern` (its first group when it has one), stripped."""
    rx = re.compile(pattern)

    def extract(text: str) -> str | None:
        last = None
        for m in rx.finditer(text):
            last = m
        if last is None:
            return None
        value = last.group(1) if rx.groups else last.group(0)
        return value.strip() if value is not None else None

    return extract


def make_extractor(name: str, pattern: str | None = None) -> Extractor:
    if name == "last-number":
        return last_number
    if name == "exact":
        return exact_text
    if name == "regex":
        if not pattern:
            raise UsageError("the regex extractor needs a pattern")
        return regex(pattern)
    raise UsageError(f"unknown extractor {name!r} (choose from last-number, regex, exact)")
