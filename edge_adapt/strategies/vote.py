"""vote / weighted-vote: N samples; the answer extracted from most of them wins (weighted-vote, also known by
Snell et al.'s name weighted-best-of-n: the answer with the largest summed p_keep). The winner's best-scored
sample is returned."""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq

from edge_adapt.engine.engine import Sample, Sequence
from edge_adapt.engine.events import Event
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import Chosen, StrategyEvent
from edge_adapt.strategies.extract import Extractor, make_extractor
from edge_adapt.strategies.registry import ANSWERS, SAMPLING, SCORED, StrategySpec, register


def tally(answers: Seq[str | None], weights: Seq[float]) -> list[tuple[str, float]]:
    """Votes per answer, most first; ties go to the answer with more samples, then to the earlier one.
    Samples without an answer do not vote."""
    votes: dict[str, float] = {}
    count: dict[str, int] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            votes[a] = votes.get(a, 0.0) + w
            count[a] = count.get(a, 0) + 1
    order = list(votes)
    return [(a, votes[a]) for a in sorted(order, key=lambda a: (-votes[a], -count[a], order.index(a)))]


def vote(engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None) -> Iterator[Event | StrategyEvent]:
    return _vote(engine, root, config, None)


def weighted_vote(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None
) -> Iterator[Event | StrategyEvent]:
    return _vote(engine, root, config, require_scorer(scorer, "weighted-vote"))


def _vote(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None
) -> Iterator[Event | StrategyEvent]:
    extract = make_extractor(config.extractor, config.pattern)
    with Pool(engine, root, config) as pool:
        yield from pool.start(config.budget, config.temperature)
        yield from engine.steps(pool.samples)
        if scorer is not None:
            yield from pool.score(scorer, pool.samples)
        weights = [pool.scores[s.index] if scorer is not None else 1.0 for s in pool.samples]
        yield choose_by_answer(pool, pool.samples, extract, weights)


def choose_by_answer(pool: Pool, samples: Seq[Sample], extract: Extractor, weights: Seq[float]) -> Chosen:
    """The answer with the most weight wins; its best-ranked sample is returned (no answer at all: the best
    sample). Snell et al.'s "best-of-N weighted" is this with p_keep as the weight."""
    answers = [extract(s.text) for s in samples]
    ranked = tally(answers, weights)
    if not ranked:
        return pool.chosen(pool.best(samples))
    winner, votes = ranked[0]
    best = pool.best([s for s, a in zip(samples, answers) if a == winner])
    return pool.chosen(best, answer=winner, votes=votes, tally=tuple(ranked))


register(StrategySpec("vote", vote, needs_scorer=False, reads=SAMPLING | ANSWERS | {"budget"}))
# Snell et al. call the same rule weighted best-of-N.
register(StrategySpec("weighted-vote", weighted_vote, reads=SCORED | ANSWERS, aliases=("weighted-best-of-n",)))
