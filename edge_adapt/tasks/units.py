"""`units`: unit and time conversions with whole-number answers, checked by stated-number ("There are 180
minutes in 3 hours" states 180 before restating the question). Levels and their measured greedy accuracy:
docs/tasks.md.
"""

from __future__ import annotations

import random

from edge_adapt.tasks.family import GeneratedFamily
from edge_adapt.tasks.scorers import StatedNumber

# (big unit, small unit, small units per big unit)
_TIME = (("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7))
_MEASURE = (("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("kilometers", "meters", 1000),
            ("liters", "milliliters", 1000), ("dollars", "cents", 100))
_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe", "Max", "Ivy", "Noah", "Lily")


def _down(r: random.Random, table: tuple[tuple[str, str, int], ...], lo: int, hi: int) -> tuple[str, str]:
    big, small, k = r.choice(table)
    x = r.randint(lo, hi)
    q = r.choice((f"How many {small} are in {x} {big}?", f"Convert {x} {big} to {small}.",
                  f"{x} {big} is how many {small}?", f"How many {small} make {x} {big}?",
                  f"What is {x} {big} in {small}?", f"{r.choice(_NAMES)} has {x} {big}. How many {small} is that?"))
    return q, str(x * k)


def _level1(r: random.Random) -> tuple[str, str]:
    # One whole unit: the model knows "an hour has 60 minutes" as a fact, and fails to multiply for 2-20 units
    # (0.05 when measured). A name and an activity make enough distinct questions for every split.
    big, small, k = r.choice(_TIME + _MEASURE)
    one = big[:-1]  # "hours" -> "hour"
    n = r.choice(_NAMES)
    q = r.choice((f"How many {small} are in one {one}?", f"How many {small} are in 1 {one}?",
                  f"{n} asks: how many {small} make one {one}?", f"{n} wants to know how many {small} are in a {one}.",
                  f"Help {n}: how many {small} are in one {one}?", f"{n} has one {one}. How many {small} is that?"))
    return q, str(k)


def _level2(r: random.Random) -> tuple[str, str]:
    return _down(r, _TIME, 2, 6)


def _level3_down(r: random.Random) -> tuple[str, str]:
    return _down(r, _MEASURE, 2, 20)


def _level4(r: random.Random) -> tuple[str, str]:
    # Up: the answer is a quotient.
    big, small, k = r.choice(_TIME + _MEASURE)
    x = r.randint(2, 12)
    q = r.choice((f"How many {big} are in {x * k} {small}?", f"Convert {x * k} {small} to {big}.",
                  f"{x * k} {small} is how many {big}?", f"What is {x * k} {small} in {big}?"))
    return q, str(x)


def _mixed(r: random.Random) -> tuple[str, str]:
    # Mixed units: a product and a sum.
    big, small, k = r.choice(_TIME[:2] + _MEASURE[:1])
    x, y = r.randint(1, 5), r.randint(1, k - 1)
    q = r.choice((f"How many {small} are in {x} {big} and {y} {small}?",
                  f"Convert {x} {big} and {y} {small} to {small}."))
    return q, str(x * k + y)


def _elapsed(r: random.Random) -> tuple[str, str]:
    # Elapsed time between two clock times on the same day, in minutes.
    h1 = r.randint(1, 9)  # ends by 12:15 at the latest: no am/pm
    m1 = r.choice((0, 15, 30, 45))
    d = r.choice((15, 30, 45, 75, 90, 105, 120, 150))
    t2 = h1 * 60 + m1 + d
    h2, m2 = divmod(t2, 60)
    return f"A lesson starts at {h1}:{m1:02d} and ends at {h2}:{m2:02d}. How many minutes long is it?", str(d)


def _level5(r: random.Random) -> tuple[str, str]:
    return _mixed(r) if r.random() < 0.5 else _elapsed(r)


UNITS = GeneratedFamily(
    "units", {1: _level1, 2: _level2, 3: _level3_down, 4: _level4, 5: _level5}, "Answer briefly.", StatedNumber(),
    max_tokens=64,
)
