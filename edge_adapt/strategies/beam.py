"""beam: step-level beam search with the self-eval score as the process verifier (Snell et al. 2024).

N = budget candidates for the first step; each round every live beam is scored at its step end, the top N/M
are kept and each is expanded with M sampled next steps. A step ends at `step_delimiter` or after
`max_step_tokens`. Expanding is a fork of the beam's KV (`seq_cp`), never a re-decode; pruned beams give their
sequence back at once. Finished beams are set aside; the search stops when N have finished, no beam is left
or after `max_rounds`; the answer is the weighted best-of-N over the finished beams (beams cut by the round
limit compete only when none finished).

lookahead reuses this loop: a step's score is read after a greedy roll-out of k more steps (lookahead.py).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence as Seq

from edge_adapt.engine.engine import Sample, Sequence
from edge_adapt.engine.events import Event
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import RoundStarted, StrategyEvent
from edge_adapt.strategies.extract import make_extractor
from edge_adapt.strategies.prune import select
from edge_adapt.strategies.registry import STEPS, StrategySpec, register
from edge_adapt.strategies.vote import choose_by_answer

# Scores `beams` (live and just finished) into pool.scores, streaming its events.
StepScorer = Callable[[Pool, Seq[Sample]], Generator["Event | StrategyEvent", None, None]]


def beam(engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None) -> Iterator[Event | StrategyEvent]:
    scorer = require_scorer(scorer, "beam")
    return search(engine, root, config, lambda pool, beams: pool.score(scorer, beams))


def search(
    engine: EngineLike, root: Sequence, config: StrategyConfig, score_steps: StepScorer
) -> Iterator[Event | StrategyEvent]:
    n, m = config.budget, config.width
    step = {"max_new": config.max_step_tokens, "pause_on": config.step_delimiter}
    with Pool(engine, root, config) as pool:
        yield from pool.start(n, config.temperature)
        live = list(pool.samples)
        finished: list[Sample] = []
        for r in range(config.max_rounds):
            yield RoundStarted(r, len(live), config.temperature)
            yield from engine.steps(live, **step)
            yield from score_steps(pool, live)
            done = [s for s in live if s.finish is not None]
            pool.release(done)  # text and score stay; the sequence is free for the next expansion
            finished += done
            live = [s for s in live if s.finish is None]
            if not live or len(finished) >= n or r == config.max_rounds - 1:
                break
            kept = select(pool, live, max(1, n // m), None)
            yield from pool.prune([s for s in live if s not in kept])
            live = []
            for parent in kept:
                before = len(pool.samples)
                yield from pool.branch(parent, m, config.temperature)
                live += pool.samples[before:]
                pool.release([parent])
        yield from pool.stop(live)
        candidates = finished or live
        extract = make_extractor(config.extractor, config.pattern)
        yield choose_by_answer(pool, candidates, extract, [pool.scores[s.index] for s in candidates])


def check_width(config: StrategyConfig) -> None:
    m = config.width
    if config.budget < m or config.budget % m:
        raise ValueError(
            f"{config.strategy} keeps budget/M beams and expands each M ways: budget ({config.budget}) must be a "
            f"multiple of the beam width M ({m})"
        )


# While a kept beam forks its M children it still holds its own sequence: budget + 1 at the peak.
register(StrategySpec("beam", beam, samples_at_once=lambda config: config.budget + 1, check=check_width, reads=STEPS))
