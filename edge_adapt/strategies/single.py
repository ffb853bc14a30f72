"""single: one sample, greedy (temperature 0) or sampled; scored only when a scorer is given."""

from __future__ import annotations

from collections.abc import Iterator

from edge_adapt.engine.engine import Sequence
from edge_adapt.engine.events import Event
from edge_adapt.strategies.base import EngineLike, Pool, Scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import StrategyEvent
from edge_adapt.strategies.registry import SAMPLING, StrategySpec, register


def single(
    engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None
) -> Iterator[Event | StrategyEvent]:
    with Pool(engine, root, config) as pool:
        yield from pool.start(1, config.temperature)
        yield from engine.steps(pool.samples)
        if scorer is not None:
            yield from pool.score(scorer, pool.samples)
        yield pool.chosen(pool.samples[0])


register(StrategySpec("single", single, needs_scorer=False, samples_at_once=lambda config: 1, reads=SAMPLING))
