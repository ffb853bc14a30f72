"""`compare`: comparing and ordering numbers. The answer is always one number (the larger, the smallest, the one
in a given place once sorted). The prompt asks for "The answer is N": unmarked, the default model's replies name
the choice first ("12 is a larger number than 6") or restate the options first ("The largest of 95, 58 and 51
is 95"), so no position rule reads them all; the marked clause is exact. Levels and their measured greedy
accuracy: docs/tasks.md.
"""

from __future__ import annotations

import random

from edge_adapt.tasks.family import GeneratedFamily
from edge_adapt.tasks.scorers import StatedNumber

COMPARE_FORMAT = 'Write "The answer is" followed by the number.'
_ORDINAL = {1: "first", 2: "second", 3: "third", 4: "fourth"}


def _distinct(r: random.Random, k: int, lo: int, hi: int) -> list[int]:
    return r.sample(range(lo, hi + 1), k)


def _listed(xs: list[int]) -> str:
    return ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"


def _level1(r: random.Random) -> tuple[str, str]:
    a, b = _distinct(r, 2, 1, 12)
    q = r.choice((f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?",
                  f"Which is greater, {a} or {b}?", f"Which is more, {a} or {b}?"))
    return q, str(max(a, b))


def _level2(r: random.Random) -> tuple[str, str]:
    a, b = _distinct(r, 2, 10, 99)
    if r.random() < 0.5:
        q = r.choice((f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?",
                      f"Which is greater, {a} or {b}?"))
        return q, str(max(a, b))
    q = r.choice((f"Which is smaller, {a} or {b}?", f"Which number is less: {a} or {b}?",
                  f"Which is lower, {a} or {b}?"))
    return q, str(min(a, b))


def _level3(r: random.Random) -> tuple[str, str]:
    xs = _distinct(r, 3, 10, 99)
    if r.random() < 0.5:
        q = r.choice((f"What is the largest of {_listed(xs)}?", f"Which is the biggest number: {_listed(xs)}?"))
        return q, str(max(xs))
    q = r.choice((f"What is the smallest of {_listed(xs)}?", f"Which is the least number: {_listed(xs)}?"))
    return q, str(min(xs))


def _level4(r: random.Random) -> tuple[str, str]:
    # Close three-digit numbers: the same digits in another order, so the comparison is about place value.
    digits = r.sample(range(1, 10), 3)
    a = digits[0] * 100 + digits[1] * 10 + digits[2]
    b = digits[0] * 100 + digits[2] * 10 + digits[1]
    if r.random() < 0.5:
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    return f"Which is smaller, {a} or {b}?", str(min(a, b))


def _level5(r: random.Random) -> tuple[str, str]:
    xs = _distinct(r, 4, 10, 99)
    k = r.randint(2, 3)
    q = f"Sort {_listed(xs)} from smallest to largest. Which number is {_ORDINAL[k]}?"
    return q, str(sorted(xs)[k - 1])


COMPARE = GeneratedFamily(
    "compare", {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}, COMPARE_FORMAT, StatedNumber(),
    max_tokens=64,
)
