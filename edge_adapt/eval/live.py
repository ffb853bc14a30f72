"""Live runs on the engine: checks that the replay predicts what a real run gets.

`run_live` is a reference implementation with the replay's exact semantics (same sampling settings, end
scores, ties by mean log-prob), run with seeds the pool never used: it checks the *replay*, so it does not go
through `edge_adapt.strategies`, whose rounds and tie-breaks are free to differ. `run_strategy_live` answers
with a strategy exactly as `edge-adapt run` does (tune-policy's live check).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edge_adapt.engine import GREEDY, Engine, Sample
from edge_adapt.eval.pool import PoolSettings, SelfEvalScorer, _score
from edge_adapt.strategies.adaptive import round_sizes
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.tasks.base import Problem, Suite


@dataclass(frozen=True)
class LiveOutcome:
    problem_id: str
    correct: bool
    samples: int
    tokens: int
    selfeval_tokens: float


def _run(engine: Engine, scorer: SelfEvalScorer, suite: Suite, problem: Problem, settings: PoolSettings,
         strategy: str, n: int, threshold: float, greedy_first: bool) -> LiveOutcome:
    live_settings = replace(settings, seed=settings.seed + 1_000_003)  # fresh seeds, never the pool's
    params = ([GREEDY] if greedy_first else []) + list(live_settings.params(problem.id))
    used: list[Sample] = []
    scores: list[float] = []
    se = 0.0
    with engine.opened(engine.chat_tokens(list(problem.messages))) as root:
        rounds = [n] if strategy == "best-of-n" else round_sizes(n)
        for size in rounds:
            new = engine.start(root, params[len(used) : len(used) + size], max_tokens=settings.budget(problem),
                               first_index=len(used))
            used += new
            for _ in engine.advance(new):
                pass
            sc, cost = _score(engine, scorer, new)
            scores += sc
            se += cost * len(new)
            for s in new:  # a scored sample is done: give its id back before the next round
                engine.release(s.seq)
            if strategy == "adaptive" and max(scores) >= threshold:
                break
    best = max(range(len(used)), key=lambda i: (scores[i], used[i].mean_logprob))
    return LiveOutcome(problem.id, bool(suite.scorer_of(problem).correct(used[best].text, problem.answer)), len(used),
                       sum(len(s.generated) for s in used), se)


def run_live(engine: Engine, scorer: SelfEvalScorer, suite: Suite, problems: Sequence[Problem],
             settings: PoolSettings, strategy: str, n: int, threshold: float = 0.0, greedy_first: bool = False):
    """Yield one LiveOutcome per problem (the caller renders progress). strategy: 'best-of-n' or 'adaptive'
    (`greedy_first`: its first round is the greedy sample, as replay.adaptive(greedy_first=True))."""
    if strategy not in ("best-of-n", "adaptive"):
        raise ValueError(f"live strategy must be best-of-n or adaptive, got {strategy!r}")
    for p in problems:
        yield _run(engine, scorer, suite, p, settings, strategy, n, threshold, greedy_first)


@dataclass(frozen=True)
class StrategyOutcome:
    """One prompt answered by a strategy from edge_adapt.strategies, with its compute account."""

    problem_id: str
    level: int | None
    correct: bool
    samples: int
    tokens: int  # generated, look-ahead roll-outs included
    selfeval_tokens: int
    wall_s: float
    difficulty_bin: int | None = None  # auto


def run_strategy_live(engine: Engine, scorer: Any, suite: Suite, problems: Sequence[Problem],
                      config: StrategyConfig) -> Iterator[StrategyOutcome]:
    """Answer each problem with `config` through `run_strategy`, exactly as `edge-adapt run` would."""
    from edge_adapt.result import collect
    from edge_adapt.strategies import run_strategy

    for p in problems:
        # unread_ok: tune-policy gives every strategy the pool's temperature; auto and adaptive schedule their own
        r = collect(run_strategy(engine, list(p.messages), config, scorer, unread_ok=True))
        u = r.usage
        yield StrategyOutcome(p.id, p.level, bool(suite.scorer_of(p).correct(r.text, p.answer)), u.samples_started,
                              u.generated_tokens, u.selfeval_tokens, u.wall_s, None if r.difficulty is None else r.difficulty.bin)
