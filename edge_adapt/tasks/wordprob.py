"""`wordprob`: arithmetic word problems in many wordings (add, subtract, multiply; one and two steps; varied
verbs, and the question first or last). `arith` keeps one wording per level on purpose; this family measures
how the default model copes when the same arithmetic is said differently. Levels and their measured greedy
accuracy: docs/tasks.md.
"""

from __future__ import annotations

import random

from edge_adapt.tasks.family import GeneratedFamily
from edge_adapt.tasks.scorers import StatedNumber

_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe", "Max", "Ivy", "Noah", "Lily", "Omar", "Rosa")
_THINGS = ("apples", "pens", "stickers", "marbles", "books", "cookies", "stamps", "coins", "shells", "cards",
           "eggs", "balloons", "pencils", "flowers")
_GROUPS = ("boxes", "bags", "jars", "packs", "baskets", "rows", "plates", "shelves")


def _who(r: random.Random) -> tuple[str, str]:
    a, b = r.sample(_NAMES, 2)
    return a, b


def _add(r: random.Random, a: int, b: int) -> str:
    n, m = _who(r)
    t = r.choice(_THINGS)
    return r.choice((
        f"{n} has {a} {t}. {m} gives {n} {b} more. How many {t} does {n} have now?",
        f"{n} picked {a} {t} in the morning and {b} {t} in the afternoon. How many {t} did {n} pick in all?",
        f"There are {a} {t} in a basket. {n} puts in {b} more. How many {t} are in the basket now?",
        f"{n} found {a} {t} and {m} found {b} {t}. How many {t} did they find together?",
        f"How many {t} does {n} have after buying {b} more, if {n} had {a} {t} before?",
        f"{n} bought {b} {t}. Before that, {n} already had {a} {t}. How many {t} does {n} have?",
        f"A shop sold {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did it sell on both days?",
    ))


def _sub(r: random.Random, a: int, b: int) -> str:
    a, b = max(a, b), min(a, b)
    n, m = _who(r)
    t = r.choice(_THINGS)
    return r.choice((
        f"{n} had {a} {t} and gave {b} to {m}. How many {t} does {n} have left?",
        f"{n} had {a} {t}. {n} lost {b} of them. How many {t} are left?",
        f"How many {t} are left if {n} starts with {a} {t} and uses {b}?",
        f"There were {a} {t} on a table. {m} took {b} away. How many {t} are on the table now?",
        f"{n} has {a} {t} and {m} has {b} {t}. How many more {t} does {n} have than {m}?",
        f"After selling {b} {t}, how many {t} does {n} still have, if {n} had {a} {t}?",
        f"{n} needs {a} {t} and already has {b}. How many more {t} does {n} need?",
    ))


def _mul(r: random.Random, a: int, b: int) -> str:
    n, _ = _who(r)
    t, g = r.choice(_THINGS), r.choice(_GROUPS)
    return r.choice((
        f"There are {a} {g} with {b} {t} in each. How many {t} are there in total?",
        f"{n} buys {a} {g} of {t}. Each one holds {b} {t}. How many {t} does {n} buy?",
        f"Each of {a} friends has {b} {t}. How many {t} do they have altogether?",
        f"How many {t} are in {a} {g} of {b} {t} each?",
        f"{n} collects {b} {t} every day for {a} days. How many {t} does {n} collect?",
        f"{b} {t} fit in one of the {g}. How many {t} fit in {a} of them?",
    ))


def _level1(r: random.Random) -> tuple[str, str]:
    # Adding, in the three wordings closest to arith's level 1 ("has N and gets M more"), which this model
    # reads best; the other wordings are level 3.
    a, b, n, t = r.randint(2, 9), r.randint(1, 9), r.choice(_NAMES), r.choice(_THINGS)
    verb = r.choice(("gets", "buys", "finds"))
    return f"{n} has {a} {t} and {verb} {b} more. How many {t} does {n} have now?", str(a + b)


def _level2(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 9), r.randint(2, 9)
    return _mul(r, a, b), str(a * b)


def _level3(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 9), r.randint(1, 9)
    return _add(r, a, b), str(a + b)


def _level4(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(5, 20), r.randint(1, 9)
    a, b = max(a, b), min(a, b)
    return _sub(r, a, b), str(a - b)


def _two_step_add(r: random.Random) -> tuple[str, str]:
    # Two steps: gets some, then gives some away.
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(1, 9)
    c = min(c, a + b - 1)
    n, m = _who(r)
    t = r.choice(_THINGS)
    q = r.choice((
        f"{n} has {a} {t}. {m} gives {n} {b} more. Then {n} gives away {c}. How many {t} does {n} have now?",
        f"{n} picked {a} {t} and then {b} more, but dropped {c}. How many {t} does {n} have?",
        f"How many {t} are left if {n} buys {a} {t}, then {b} more, and eats {c}?",
    ))
    return q, str(a + b - c)


def _two_step_mul(r: random.Random) -> tuple[str, str]:
    # Two steps: a product, then more added or some taken away.
    a, b, c = r.randint(2, 6), r.randint(2, 6), r.randint(1, 9)
    n, _ = _who(r)
    t, g = r.choice(_THINGS), r.choice(_GROUPS)
    if r.random() < 0.5:
        q = r.choice((
            f"{n} has {a} {g} with {b} {t} in each, and {c} loose {t}. How many {t} does {n} have?",
            f"There are {a} {g} of {b} {t} and {c} more {t} on the floor. How many {t} are there?",
        ))
        return q, str(a * b + c)
    c = min(c, a * b - 1)
    q = r.choice((
        f"{n} has {a} {g} with {b} {t} in each and gives away {c} {t}. How many {t} are left?",
        f"There are {a} {g} of {b} {t}. {n} takes {c} {t}. How many {t} remain?",
    ))
    return q, str(a * b - c)


def _level5(r: random.Random) -> tuple[str, str]:
    return _two_step_add(r) if r.random() < 0.5 else _two_step_mul(r)


WORDPROB = GeneratedFamily(
    "wordprob", {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}, "Answer briefly.", StatedNumber(),
    max_tokens=96,
)
