"""Task families: seeded problem generators with levels, hash-disjoint splits and an exact scorer each.

A family is anything with a name, levels, a scorer, a suggested `max_tokens` and `problems(level, split, n,
seed)`. Most are `GeneratedFamily`: one function per level that draws (question, answer) from a seeded
`random.Random`. A question belongs to the split its text hashes to (80% train, 10% validation, 10% test), and
each (level, split) draws from its own seeded stream keeping only questions of its own split, so the splits are
disjoint by construction and the first n problems never depend on how many are asked for.

`family_suite` spreads n problems over a family's levels (interleaved, so any prefix stays balanced), and
`mix_suite` interleaves several families the same way (a seeded family order per round), so a prefix of a
suite is always the same problems: pool caches and label files made from a shorter suite are reused.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from edge_adapt.errors import UsageError
from edge_adapt.tasks.base import SPLITS, Problem, Suite, stable_hash, user
from edge_adapt.tasks.scorers import Scorer

Generator = Callable[[random.Random], tuple[str, str | int]]  # (question, answer)


class Family(Protocol):
    name: str
    levels: tuple[int, ...]
    scorer: Scorer
    max_tokens: int  # enough for this family's replies from the default model (measured: docs/tasks.md)

    def problems(self, level: int, split: str, n: int, seed: int = 0) -> list[Problem]: ...


def split_of(family: str, question: str, seed: int) -> str:
    """The split a question belongs to: a stable hash of its text (80 / 10 / 10)."""
    b = stable_hash(f"{family}-split", seed, question) % 10
    return "train" if b < 8 else "validation" if b == 8 else "test"


def check_level_split(family: Family, level: int, split: str) -> None:
    if level not in family.levels:
        raise UsageError(f"{family.name} has levels {', '.join(map(str, family.levels))}, not {level}")
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


@dataclass(frozen=True)
class GeneratedFamily:
    """A procedurally generated family: `generators[level](rng) -> (question, answer)`; every prompt is the
    question followed by `instruction`."""

    name: str
    generators: Mapping[int, Generator]
    instruction: str
    scorer: Scorer
    max_tokens: int = 96
    # Levels whose answers are checked differently from `scorer` (a weekday rather than a number).
    level_scorers: Mapping[int, Scorer] = field(default_factory=dict)
    # Distinct questions a level can produce are finite (single digits...): give up after this many draws per
    # problem rather than loop forever when a split runs dry, or sooner, after `dry_draws` draws in a row that
    # found nothing new (a split that has run dry: --prompts 100000000 is refused in a second, not in hours).
    draws_per_problem: int = 200
    dry_draws: int = 20_000
    levels: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(sorted(self.generators)))

    def problems(self, level: int, split: str, n: int, seed: int = 0) -> list[Problem]:
        """The first `n` problems of a level in a split; the same arguments always give the same problems."""
        check_level_split(self, level, split)
        r = random.Random(stable_hash(self.name, seed, level, split))
        seen: set[str] = set()
        out: list[Problem] = []
        scorer = self.level_scorers.get(level)
        dry = 0
        for _ in range(self.draws_per_problem * n + 1000):
            if len(out) == n or dry == self.dry_draws:
                break
            q, ans = self.generators[level](r)
            if q in seen or split_of(self.name, q, seed) != split:
                dry += 1
                continue
            dry = 0
            seen.add(q)
            pid = f"{self.name}-L{level}-{split}-{len(out)}"
            out.append(Problem(pid, user(f"{q} {self.instruction}"), str(ans), level, scorer))
        if len(out) < n:
            raise UsageError(f"{self.name} level {level} has fewer than {n} distinct {split} problems")
        return out


def family_suite(family: Family, split: str = "test", n: int = 200, seed: int = 0,
                 levels: Sequence[int] | None = None) -> Suite:
    """`n` problems spread evenly over `levels` (all when omitted), interleaved level by level."""
    lv = tuple(levels) if levels else family.levels
    for level in lv:
        check_level_split(family, level, split)
    per = -(-n // len(lv))
    by_level = [family.problems(level, split, per, seed) for level in lv]
    mixed = [replace(p, max_tokens=p.max_tokens or family.max_tokens, family=family.name)
             for group in zip(*by_level) for p in group][:n]
    return Suite(family.name, split, tuple(mixed), family.scorer)


def mix_suite(families: Sequence[Family], split: str = "test", n: int = 200, seed: int = 0) -> Suite:
    """`n` problems drawn round-robin from `families` (each round in a seeded order), each family's share spread
    over its levels; ids start with the family name. With n >= len(families) every family is present."""
    if not families:
        raise UsageError("a mix needs at least one family")
    per = -(-n // len(families))
    # Each problem keeps its family's scorer: the mix has no one scorer for all.
    suites = [[replace(p, scorer=s.scorer_of(p)) for p in s.problems]
              for s in (family_suite(f, split, per, seed) for f in families)]
    out: list[Problem] = []
    for i in range(per):
        # The order within a round depends on (seed, round) only, so a shorter mix is a prefix of a longer one.
        order = list(range(len(families)))
        random.Random(stable_hash("mix-order", seed, i)).shuffle(order)
        out.extend(suites[j][i] for j in order)
    return Suite("mix", split, tuple(out[:n]), PerProblem())


@dataclass(frozen=True)
class PerProblem:
    """The suite-level scorer of a mix, whose problems each carry their family's: asking it is a bug, so it says
    so rather than check a weekday answer as a number."""

    name: str = "per-family"

    def extract(self, text: str) -> str | None:
        raise TypeError("a mix's problems carry their own scorers: use suite.scorer_of(problem)")

    def correct(self, text: str, reference: str) -> bool:
        raise TypeError("a mix's problems carry their own scorers: use suite.scorer_of(problem)")
