"""Strategy-level events, streamed beside the engine's SampleStarted / Token / Finished / Done."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundStarted:
    """adaptive: a round of `n` new samples at `temperature` begins."""

    round: int
    n: int
    temperature: float


@dataclass(frozen=True)
class Scored:
    """A sample's self-evaluation: p_keep after `n_tokens` generated tokens (`final` when it had finished)."""

    sample: int
    p_keep: float
    n_tokens: int
    final: bool


@dataclass(frozen=True)
class Pruned:
    """A sample left the candidate pool at a prune point. If it was still generating, Finished(reason
    'pruned') follows; a sample that had already finished gets no second Finished."""

    sample: int
    p_keep: float
    n_tokens: int


@dataclass(frozen=True)
class Chosen:
    """The strategy's answer: the chosen sample and why (its score, or its answer's votes)."""

    sample: int
    text: str
    p_keep: float | None
    mean_logprob: float
    n_tokens: int
    finish: str
    answer: str | None = None  # vote strategies: the extracted answer that won
    votes: float | None = None  # its count (vote) or summed p_keep (weighted-vote)
    tally: tuple[tuple[str, float], ...] = ()  # every answer and its votes, best first


@dataclass(frozen=True)
class RolledOut:
    """lookahead: a throw-away greedy continuation of `sample` (`n_tokens` generated, discarded afterwards)
    was scored `p_keep`; that score is the sample's at this step."""

    sample: int
    n_tokens: int
    p_keep: float


@dataclass(frozen=True)
class DifficultyEstimated:
    """auto: the probe sample's p_keep put the prompt in `bin` (1 = easiest .. 5 = hardest); `choice` is the
    strategy the policy picks there. `row_budget`: where the policy has no row for the caller's budget, the
    budget of the largest row below it, which ran (the rest of the caller's budget is not spent)."""

    bin: int
    p_keep: float
    choice: str
    row_budget: int | None = None


StrategyEvent = RoundStarted | Scored | Pruned | Chosen | RolledOut | DifficultyEstimated
