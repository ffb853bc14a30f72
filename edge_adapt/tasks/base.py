"""What a task suite is: problems with reference answers, and the scorer that checks replies."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edge_adapt.engine.chat import Message
from edge_adapt.errors import UsageError
from edge_adapt.tasks.scorers import Scorer

Split = str  # "train" | "validation" | "test"
SPLITS = ("train", "validation", "test")

# Tokens a reply may take when neither the run nor the problem says (arith's budget; enough for a brief answer).
DEFAULT_MAX_TOKENS = 96

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
    # Tokens a reply to it may take when the run does not say: its family's (a mix keeps each family's).
    max_tokens: int | None = None
    # The built-in family whose suite it comes from (set by tasks.family.family_suite, which a mix draws from too);
    # None for a user's suite file, whatever its ids look like. What pool keys and per-family report rows go by.
    family: str | None = None

    def budget(self, max_tokens: int | None = None) -> int:
        """Tokens a reply may take: the run's `max_tokens` when given, else the problem's own, else 96."""
        return max_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

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

    def budget(self, max_tokens: int | None = None) -> int | None:
        """The reply budget a run over this suite has: `max_tokens` when given; else the one its problems share
        (a family's); None when they differ (a mix: each problem keeps its family's, see Problem.budget)."""
        budgets = {p.budget(max_tokens) for p in self.problems}
        return budgets.pop() if len(budgets) == 1 else None

    def longest_budget(self, max_tokens: int | None = None) -> int:
        """The most tokens any reply of a run over this suite may take (what engines are sized for)."""
        return max((p.budget(max_tokens) for p in self.problems), default=max_tokens or DEFAULT_MAX_TOKENS)

    def shortest_budget(self, max_tokens: int | None = None) -> int:
        """The fewest tokens a reply's budget allows (prune points and cuts must lie below it)."""
        return min((p.budget(max_tokens) for p in self.problems), default=max_tokens or DEFAULT_MAX_TOKENS)

    def points_below_budget(self, what: str, points: list[int], max_tokens: int | None = None, *,
                            given: bool = True, per_reply: bool = False) -> list[int]:
        """Token counts (prune points, label cuts; increasing) below the replies' budget. Points a user gave that
        do not fit are a one-line UsageError; default ones are cut to those that fit (a reply of at most 64 tokens
        is labelled at 16 and 32, not refused for the 64 it never passes). A pool's prune points must fit every
        reply's budget; `per_reply` points (label's cuts) are applied to each reply only where it passed them, so
        they need fit only the longest budget (a mix's 256-token replies are cut at 64, its 64-token ones not)."""
        limit = self.longest_budget(max_tokens) if per_reply else self.shortest_budget(max_tokens)
        if not given:
            return [p for p in points if p < limit]
        if points and points[-1] >= limit:
            budget = f"--max-tokens {limit}" if max_tokens else f"the {'longest' if per_reply else 'shortest'} " \
                f"reply budget of suite {self.name!r}, {limit} tokens (--max-tokens sets one)"
            raise UsageError(f"{what} {points[-1]} must be below {budget}")
        return points


def user(content: str) -> tuple[Message, ...]:
    return ({"role": "user", "content": content},)


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same on every machine and Python run (unlike hash())."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")
