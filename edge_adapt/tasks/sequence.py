"""`sequence`: the next element of a simple number sequence. The answer is one number (stated-number checker:
"The next number is 28"). Levels and their measured
greedy accuracy: docs/tasks.md.
"""

from __future__ import annotations

import random

from edge_adapt.tasks.family import GeneratedFamily
from edge_adapt.tasks.scorers import StatedNumber


def _ask(r: random.Random, xs: list[int]) -> str:
    s = ", ".join(map(str, xs))
    return r.choice((f"What number comes next: {s}, ?", f"What is the next number in the sequence {s}?",
                     f"Continue the pattern: {s}. What comes next?", f"What comes after {s}?"))


def _arithmetic(r: random.Random, start: tuple[int, int], steps: tuple[int, ...], length: int = 4) -> tuple[str, str]:
    a, d = r.randint(*start), r.choice(steps)
    xs = [a + i * d for i in range(length)]
    return _ask(r, xs), str(a + length * d)


def _level1(r: random.Random) -> tuple[str, str]:
    # Counting up by one, said as counting: "Count up: 24, 25, 26, 27." got "The next number is 28." when probed.
    a = r.randint(1, 200)
    xs = ", ".join(str(a + i) for i in range(4))
    return r.choice((f"Count up: {xs}. What comes next?", f"Keep counting: {xs}. What is the next number?")), str(a + 4)


def _level2(r: random.Random) -> tuple[str, str]:
    a = r.randint(10, 200)
    xs = ", ".join(str(a - i) for i in range(4))
    q = r.choice((f"Count down: {xs}. What comes next?", f"Keep counting down: {xs}. What is the next number?"))
    return q, str(a - 4)


def _level3(r: random.Random) -> tuple[str, str]:
    return _arithmetic(r, (1, 100), (2, 5, 10))


def _level4(r: random.Random) -> tuple[str, str]:
    return _arithmetic(r, (1, 50), (3, 4, 6, 7, 8, 9))


def _level5(r: random.Random) -> tuple[str, str]:
    # Falling by more than one, or growing by a factor: the model keeps adding a small step.
    if r.random() < 0.5:
        return _arithmetic(r, (40, 99), (-2, -3, -5, -10))
    a, k, length = r.randint(1, 12), r.choice((2, 3, 10)), r.randint(3, 5)
    xs = [a * k**i for i in range(length)]
    return _ask(r, xs), str(a * k**length)


SEQUENCE = GeneratedFamily(
    "sequence", {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}, "Answer briefly.", StatedNumber(),
    max_tokens=64,
)
