"""What a task suite is: problems with reference answers, and the scorer that checks replies."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edge_adapt.engine.chat import Message
from edge_adapt.tasks.scorers import Scorer

Split = str  # "train" | "validation" | "test"
SPLITS = ("train", "validation", "test")

# Appended to every generated question so the answer can be extracted (scorers look for "answer is N").
ANSWER_FORMAT = 'Give a short explanation, then write "The answer is" followed by the number.'


@dataclass(frozen=True)
class Problem:
    """One prompt: its chat messages (the last one from the user), the reference answer and a difficulty level."""

    id: str
    messages: tuple[Message, ...]
    answer: str
    level: int | None = None
    # This problem's checker when it is not its suite's: a mix keeps each family's, a family may differ by level.
    scorer: Scorer | None = None

    @property
    def text(self) -> str:
        """The prompt as one string: what the pool key hashes."""
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


@dataclass(frozen=True)
class Suite:
    name: str
    split: str
    problems: tuple[Problem, ...]
    scorer: Scorer

    def __len__(self) -> int:
        return len(self.problems)

    def scorer_of(self, problem: Problem) -> Scorer:
        """The scorer that checks replies to `problem`: its own when it has one, else the suite's."""
        return problem.scorer or self.scorer


def user(content: str) -> tuple[Message, ...]:
    return ({"role": "user", "content": content},)


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same on every machine and Python run (unlike hash())."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")
