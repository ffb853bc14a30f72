"""`gsm8k`: grade-school word problems from GSM8K's training split (MIT; read from ../shared/data beside the
checkout, never downloaded). Only the training split is here, so train / validation / test are carved from it by
a stable hash of the question (80 / 10 / 10), as the generated families are. Levels are the number of steps of
the reference solution (its lines before '#### N'). Replies are asked to show their work and end in the number;
stated-number reads the last "answer is" clause, else the last "= N" / "is N", else the last number.

`--suite gsm8k` is different and unchanged: a GSM8K-format file read in file order, whatever the split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from edge_adapt.errors import UsageError
from edge_adapt.tasks.base import Problem, stable_hash, user
from edge_adapt.tasks.family import check_level_split, split_of
from edge_adapt.tasks.files import GSM8K_DEFAULT, _read_jsonl
from edge_adapt.tasks.scorers import Scorer, StatedNumber, reference_number

GSM8K_FORMAT = 'Show your work, then write "The answer is" followed by the number.'
# Steps of the reference solution per level: 2 or fewer, 3, 4, 5 or more.
_LEVEL_STEPS = {1: (1, 2), 2: (3, 3), 3: (4, 4), 4: (5, 99)}


def steps_of(solution: str) -> int:
    """The reference solution's steps: its non-empty lines before the '#### N' line."""
    return sum(1 for line in solution.rsplit("####", 1)[0].splitlines() if line.strip())


@lru_cache(maxsize=4)
def _rows(path: str, mtime_ns: int) -> tuple[tuple[str, str, int], ...]:
    """(question, reference number, steps) per line; cached per file version, as every level and split reads it."""
    out = []
    for lineno, row in _read_jsonl(Path(path)):
        if "question" not in row or "answer" not in row:
            raise UsageError(f"{path}:{lineno}: needs 'question' and 'answer'")
        ref = reference_number(str(row["answer"]))
        if ref is None:
            raise UsageError(f"{path}:{lineno}: the answer has no final number ('#### N')")
        out.append((str(row["question"]), ref, steps_of(str(row["answer"]))))
    return tuple(out)


@dataclass(frozen=True)
class Gsm8kFamily:
    path: Path = GSM8K_DEFAULT
    name: str = "gsm8k"
    levels: tuple[int, ...] = tuple(_LEVEL_STEPS)
    scorer: Scorer = field(default_factory=StatedNumber)
    max_tokens: int = 256

    def problems(self, level: int, split: str, n: int, seed: int = 0) -> list[Problem]:
        """The first `n` problems of a level in a split: the file's questions of that split and level in a
        seeded order (so a prefix is a fair sample and stays the same as n grows)."""
        check_level_split(self, level, split)
        path = Path(self.path)
        if not path.is_file():
            raise UsageError(f"the gsm8k family reads {path}, which does not exist (pass --data FILE)")
        lo, hi = _LEVEL_STEPS[level]
        seen: set[str] = set()
        chosen: list[tuple[str, str]] = []
        for q, ref, steps in _rows(str(path.resolve()), path.stat().st_mtime_ns):
            if lo <= steps <= hi and q not in seen and split_of(self.name, q, seed) == split:
                seen.add(q)
                chosen.append((q, ref))
        random.Random(stable_hash(self.name, seed, level, split)).shuffle(chosen)
        if len(chosen) < n:
            raise UsageError(f"{path} has {len(chosen)} gsm8k level {level} {split} problems, fewer than {n}")
        return [Problem(f"{self.name}-L{level}-{split}-{j}", user(f"{q} {GSM8K_FORMAT}"), ref, level)
                for j, (q, ref) in enumerate(chosen[:n])]


GSM8K = Gsm8kFamily()
