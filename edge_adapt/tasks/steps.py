"""`steps`: the long-answer family. Multi-step word problems whose prompt asks for the working, one step per
line, and then "The answer is N": the default model's greedy replies average 108 tokens (63 at level 1 to 158 at level 5: docs/tasks.md), so
mid-generation pruning at 16 / 32 / 64 tokens cuts replies that are still working. The final answer is checked
exactly by stated-number (the last "answer is" clause wins over numbers in the working).
"""

from __future__ import annotations

import random

from edge_adapt.tasks.family import GeneratedFamily
from edge_adapt.tasks.scorers import StatedNumber
from edge_adapt.tasks.wordprob import _GROUPS, _NAMES, _THINGS

STEPS_FORMAT = 'Show your steps, one per line, then write "The answer is" followed by the number.'


def _level1(r: random.Random) -> tuple[str, str]:
    # One addition, worked in steps: the model restates, adds and repeats itself (~70-110 tokens) and is often
    # right; three additions in a row were 0 of 20 when measured.
    a, b = r.randint(2, 9), r.randint(2, 9)
    n, t = r.choice(_NAMES), r.choice(_THINGS)
    verb = r.choice(("buys", "finds", "is given", "gets"))
    return f"{n} has {a} {t} and {verb} {b} more. How many {t} does {n} have now?", str(a + b)


def _level2(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 9), r.randint(2, 9)
    n, t, g = r.choice(_NAMES), r.choice(_THINGS), r.choice(_GROUPS)
    return f"{n} has {a} {g} with {b} {t} in each. How many {t} does {n} have?", str(a * b)


def _level3(r: random.Random) -> tuple[str, str]:
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(2, 9)
    n, t = r.choice(_NAMES), r.choice(_THINGS)
    return f"{n} has {a} {t}, buys {b} more and is given {c} more. How many {t} does {n} have?", str(a + b + c)


def _times_plus(r: random.Random) -> tuple[str, str]:
    a, b, c = r.randint(2, 6), r.randint(2, 6), r.randint(1, 9)
    n, t, g = r.choice(_NAMES), r.choice(_THINGS), r.choice(_GROUPS)
    return f"{n} has {a} {g} with {b} {t} in each and {c} more {t}. How many {t} does {n} have?", str(a * b + c)


def _times_minus(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 6), r.randint(2, 6)
    c = r.randint(1, a * b - 1)
    n, t, g = r.choice(_NAMES), r.choice(_THINGS), r.choice(_GROUPS)
    return f"{n} fills {a} {g} with {b} {t} each, then gives away {c} {t}. How many {t} are left?", str(a * b - c)


def _three_steps(r: random.Random) -> tuple[str, str]:
    a, b, c = r.randint(2, 5), r.randint(2, 5), r.randint(2, 9)
    d = r.randint(1, a * b + c - 1)
    n, t, g = r.choice(_NAMES), r.choice(_THINGS), r.choice(_GROUPS)
    q = (f"{n} has {a} {g} with {b} {t} in each. {n} buys {c} more {t}, then gives {d} {t} to a friend. "
         f"How many {t} does {n} have now?")
    return q, str(a * b + c - d)


def _sharing(r: random.Random) -> tuple[str, str]:
    k, per, extra = r.randint(2, 5), r.randint(2, 6), r.randint(1, 9)
    n, t = r.choice(_NAMES), r.choice(_THINGS)
    q = (f"{n} has {k * per} {t} and shares them equally among {k} friends. One friend then finds {extra} more "
         f"{t}. How many {t} does that friend have?")
    return q, str(per + extra)


def _level4(r: random.Random) -> tuple[str, str]:
    return _times_plus(r) if r.random() < 0.5 else _times_minus(r)


def _level5(r: random.Random) -> tuple[str, str]:
    return _three_steps(r) if r.random() < 0.5 else _sharing(r)


STEPS = GeneratedFamily(
    "steps", {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}, STEPS_FORMAT, StatedNumber(),
    max_tokens=256,
)
