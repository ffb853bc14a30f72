"""`arith`: procedurally generated arithmetic word problems in five difficulty levels, seeded.

Levels (operands drawn uniformly; every question ends with "Answer briefly."):

| level | kind                                        | example                                            |
| ----- | ------------------------------------------- | -------------------------------------------------- |
| 1     | single-digit sum, word problem              | Tom has 3 apples and gets 4 more. How many ...?    |
| 2     | single-digit product (3-9), word problem    | There are 6 boxes with 7 pens in each. How ...?    |
| 3     | two-digit sum (10-49), bare                 | What is 23 + 41?                                   |
| 4     | sum of three single-digit numbers, bare     | Compute 4 + 8 + 3.                                 |
| 5     | two-digit sum or difference, word problem   | Ana had 52 stamps and gave away 17. How many ...?  |

Measured greedy accuracy of the embedded SmolLM2-135M-Instruct Q4_1 (validation split, seed 0, 48 prompts per
level, max_tokens 96, 2 CPU cores): level 1 0.67 (32/48), level 2 0.42 (20/48), level 3 0.38 (18/48),
level 4 0.12 (6/48), level 5 0.08 (4/48). Reproduce with `python -m edge_adapt.tasks.measure arith --prompts 48`.

How the levels were tuned (greedy, 96 random prompts per candidate, same model): this model's accuracy depends
more on the wording than on the arithmetic. Told to "give a short explanation, then write 'The answer is'", it
skips the working and guesses (single-digit sums 0.17 on the test split); asked to answer briefly it writes
"3 + 4 = 7". Bare single-digit products (0.70) are easier for it than bare single-digit sums (0.64) or
subtractions (0.39); two-digit plus one-digit (0.09) is harder than two-digit plus two-digit (0.23). Word
problems that only restate the numbers ("found 3 in the morning and 4 in the afternoon") pull level 1 down to
0.31, so level 1 keeps the "has N and gets M more" wording. The levels order what the model finds hard.

Splits are disjoint by construction: a question belongs to the split its text hashes to (80% train, 10%
validation, 10% test); each split draws candidates from its own seeded stream and keeps only its own. `arith` is
a `GeneratedFamily` (edge_adapt.tasks.family) like the other families, with the same problems and ids as before.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from edge_adapt.tasks.base import Problem, Suite
from edge_adapt.tasks.family import GeneratedFamily, family_suite
from edge_adapt.tasks.scorers import FinalNumber

LEVELS = (1, 2, 3, 4, 5)
# From `python -m edge_adapt.tasks.measure arith --prompts 48` (greedy, validation split, max_tokens 96).
LEVEL_GREEDY_ACCURACY: dict[int, float] = {1: 0.67, 2: 0.42, 3: 0.38, 4: 0.12, 5: 0.08}

# Brief, not "explain, then write 'The answer is'": why is in the module docstring.
ARITH_FORMAT = "Answer briefly."

_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Eva", "Ben", "Zoe", "Max", "Ivy", "Noah", "Lily")
_THINGS = ("apples", "pens", "stickers", "marbles", "books", "cookies", "stamps", "coins", "shells", "cards")
_BOXES = ("boxes", "bags", "jars", "packs", "baskets", "shelves")
# The bare-expression wordings this model answers best (greedy per wording on 400 sums ranged 0.15-0.87;
# these five were 0.64-0.79): a level's difficulty should come from its arithmetic, not from its wording.
_ASK = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "Quick: {e}?", "What number is {e}?")


def _level1(r: random.Random) -> tuple[str, int]:
    # One wording only: asked briefly, the model restates "found 3 in the morning and 4 in the afternoon"
    # or "3 on a table and 4 on a chair" without adding (greedy 0.31 with those mixed in, 0.68 without).
    a, b, n, t = r.randint(1, 9), r.randint(1, 9), r.choice(_NAMES), r.choice(_THINGS)
    return f"{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", a + b


def _level2(r: random.Random) -> tuple[str, int]:
    a, b, t, x = r.randint(3, 9), r.randint(3, 9), r.choice(_THINGS), r.choice(_BOXES)
    return f"There are {a} {x} with {b} {t} in each. How many {t} are there in total?", a * b


def _level3(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 49), r.randint(10, 49)
    return r.choice(_ASK).format(e=f"{a} + {b}"), a + b


def _level4(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)
    return r.choice(_ASK).format(e=f"{a} + {b} + {c}"), a + b + c


def _level5(r: random.Random) -> tuple[str, int]:
    a, b, n, t = r.randint(10, 99), r.randint(10, 99), r.choice(_NAMES), r.choice(_THINGS)
    if r.random() < 0.5:
        return f"{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?", a + b
    a, b = max(a, b), min(a, b)
    return f"{n} had {a} {t} and gave away {b}. How many {t} does {n} have left?", a - b


_GENERATORS: dict[int, Callable[[random.Random], tuple[str, int]]] = {
    1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5,
}


ARITH = GeneratedFamily("arith", _GENERATORS, ARITH_FORMAT, FinalNumber(), max_tokens=96)


def arith_problems(level: int, split: str = "test", n: int = 50, seed: int = 0) -> list[Problem]:
    """The first `n` problems of a level in a split; the same arguments always give the same problems."""
    return ARITH.problems(level, split, n, seed)


def arith_suite(split: str = "test", n: int = 200, seed: int = 0, levels: tuple[int, ...] = LEVELS) -> Suite:
    """`n` problems spread evenly over `levels` (interleaved level by level, so a prefix stays balanced)."""
    return family_suite(ARITH, split, n, seed, levels)


if __name__ == "__main__":
    for lv in LEVELS:
        print(arith_problems(lv, "test", 2)[0].messages[0]["content"])
