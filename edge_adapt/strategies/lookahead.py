"""lookahead: beam search (beam.py) where a step is scored at the end of a greedy roll-out of k more steps
from it, not at the step itself: a better-informed verifier for about N·(k+1) generated tokens a round. The
roll-outs are forks of the beam's KV and are dropped once scored; their tokens count as generated compute
(RolledOut events say how many)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq

from edge_adapt.engine.engine import Sample, Sequence
from edge_adapt.engine.events import Event, Finished, Token
from edge_adapt.engine.steps import watched
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.beam import check_width, search
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import RolledOut, Scored, StrategyEvent
from edge_adapt.strategies.registry import STEPS, StrategySpec, register


def lookahead(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None
) -> Iterator[Event | StrategyEvent]:
    scorer = require_scorer(scorer, "lookahead")

    def score_steps(pool: Pool, beams: Seq[Sample]) -> Iterator[Event | StrategyEvent]:
        return rolled_out_scores(engine, pool, beams, scorer, config)

    return search(engine, root, config, score_steps)


def rolled_out_scores(
    engine: EngineLike, pool: Pool, beams: Seq[Sample], scorer: Scorer, config: StrategyConfig
) -> Iterator[Event | StrategyEvent]:
    """Finished beams are scored as they are; each live one through a greedy roll-out of `config.lookahead`
    steps, whose score becomes the beam's. The roll-outs are released before this returns."""
    yield from pool.score(scorer, [b for b in beams if b.finish is not None])
    live = [b for b in beams if b.finish is None]
    rolls: list[Sample] = []
    for b in live:
        before = len(pool.samples)
        yield from pool.branch(b, 1, 0.0, announce=False)
        rolls += pool.samples[before:]
    rolled = {r.index for r in rolls}

    def seen(ev: object) -> bool:  # a roll-out is not a sample (never started as one): its tokens are compute, counted
        return not (isinstance(ev, (Token, Finished)) and ev.sample in rolled)  # by RolledOut, its end is no answer

    try:
        for _ in range(config.lookahead):
            yield from watched(engine.steps(rolls, max_new=config.max_step_tokens, pause_on=config.step_delimiter),
                               keep=seen)
        scores = (yield from scorer.steps(rolls)) if rolls else []
    finally:
        pool.release(rolls)
    for b, roll, p in zip(live, rolls, scores):
        pool.scores[b.index] = p
        yield RolledOut(b.index, len(roll.generated) - len(b.generated), p)
        yield Scored(b.index, p, len(b.generated), False)


# Every live beam and its roll-out.
register(StrategySpec("lookahead", lookahead, samples_at_once=lambda config: 2 * config.budget, check=check_width,
                      reads=STEPS | {"lookahead"}))
