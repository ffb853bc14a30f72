"""`dates`: calendar questions: the day after or before a weekday, a weekday some days on, and the days between
two dates. Weekday answers are checked by `Weekday` (the last weekday a reply names), day counts by
stated-number. (Not `calendar.py`: that would shadow the standard library module when run as a script.)
Levels and their measured greedy accuracy: docs/tasks.md.
"""

from __future__ import annotations

import random

from edge_adapt.tasks.family import GeneratedFamily
from edge_adapt.tasks.scorers import WEEKDAYS, StatedNumber, Weekday

_MONTHS = (("January", 31), ("February", 28), ("March", 31), ("April", 30), ("May", 31), ("June", 30),
           ("July", 31), ("August", 31), ("September", 30), ("October", 31), ("November", 30), ("December", 31))
# February's length depends on the year, which the questions do not give: no question touches it.
_NO_FEB = tuple(m for m in _MONTHS if m[0] != "February")
_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe", "Max", "Ivy", "Noah", "Lily")
_EVENTS = ("party", "match", "trip", "test", "concert", "picnic", "visit", "lesson")


def _next_or_previous(r: random.Random, step: int) -> tuple[str, str]:
    # Seven weekdays give few questions: named events make enough distinct ones for every split.
    i = r.randrange(7)
    d, n, e = WEEKDAYS[i], r.choice(_NAMES), r.choice(_EVENTS)
    rel = "after" if step == 1 else "before"
    q = r.choice((f"{n}'s {e} is on the day {rel} {d}. On what day is the {e}?",
                  f"{n} has a {e} the day {rel} {d}. What day is the {e}?",
                  f"If today is {d}, what day is {'tomorrow' if step == 1 else 'yesterday'}?"))
    return q, WEEKDAYS[(i + step) % 7]


def _level1(r: random.Random) -> tuple[str, str]:
    return _next_or_previous(r, 1)


def _level2(r: random.Random) -> tuple[str, str]:
    return _next_or_previous(r, -1)


def _level3(r: random.Random) -> tuple[str, str]:
    i, k, n = r.randrange(7), r.randint(2, 6), r.choice(_NAMES)
    d = WEEKDAYS[i]
    if r.random() < 0.5:
        return f"Today is {d}. {n} leaves in {k} days. On what day does {n} leave?", WEEKDAYS[(i + k) % 7]
    return f"Today is {d}. {n} arrived {k} days ago. On what day did {n} arrive?", WEEKDAYS[(i - k) % 7]


def _level4(r: random.Random) -> tuple[str, str]:
    month, days = r.choice(_NO_FEB)
    a = r.randint(1, days - 2)
    b = r.randint(a + 1, min(days, a + 20))
    q = r.choice((f"How many days are there from {month} {a} to {month} {b}?",
                  f"A trip starts on {month} {a} and ends on {month} {b}. How many days later does it end?"))
    return q, str(b - a)


def _level5(r: random.Random) -> tuple[str, str]:
    # Across a month's end: the month's length matters.
    k = r.choice([i for i in range(12) if "February" not in (_MONTHS[i][0], _MONTHS[(i + 1) % 12][0])])
    (m1, d1), (m2, _) = _MONTHS[k], _MONTHS[(k + 1) % 12]
    a, b = r.randint(d1 - 9, d1), r.randint(1, 10)
    return f"How many days are there from {m1} {a} to {m2} {b}?", str(d1 - a + b)


DATES = GeneratedFamily(
    "dates", {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}, "Answer briefly.", StatedNumber(),
    max_tokens=64, level_scorers={1: Weekday(), 2: Weekday(), 3: Weekday()},
)
