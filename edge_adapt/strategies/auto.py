"""auto: compute-optimal test-time compute (Snell et al. 2024). One probe sample (counted in the budget) is
generated and scored; its p_keep puts the prompt in a difficulty bin, and the policy file says what to spend
there at this budget: nothing more (answer with the probe), or a strategy with its settings, run on the same
prompt KV. Easy prompts stop early, prompts the model cannot solve stop too, the rest get the search."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from edge_adapt.engine.engine import Sequence
from edge_adapt.engine.events import Event
from edge_adapt.errors import UsageError
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import DifficultyEstimated, StrategyEvent
from edge_adapt.strategies.policy import PROBE, Policy


def policy_path(config: StrategyConfig) -> Path:
    if config.policy is not None:
        return config.policy
    from edge_adapt.engine.default_model import default_policy

    shipped = default_policy()
    if shipped is None:
        raise UsageError("strategy 'auto' needs a policy file (--policy); none is shipped with this install")
    return shipped


def checked_policy(config: StrategyConfig, engine: EngineLike) -> Policy:
    """The policy `auto` follows, refused before anything is generated if it was tuned for another model or
    has no row for the budget."""
    policy = Policy.load(policy_path(config))
    policy.check_model(getattr(engine, "fingerprint", policy.model))
    policy.row_for(config.budget)
    return policy


def sub_config(config: StrategyConfig, policy: Policy, bin: int) -> StrategyConfig | None:
    """The strategy the policy runs in this bin (None: answer with the probe). Its samples are seeded after
    the probe's."""
    _, row = policy.row_for(config.budget)
    choice = row[bin - 1]
    if choice.strategy == PROBE:
        return None
    return config.with_options(**{**choice.options, "strategy": choice.strategy, "seed": config.seed + 1})


def auto(engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None) -> Iterator[Event | StrategyEvent]:
    from edge_adapt.strategies.registry import STRATEGIES

    scorer = require_scorer(scorer, "auto")
    policy = checked_policy(config, engine)
    with Pool(engine, root, config) as pool:
        yield from pool.start(1, policy.probe_temperature)
        yield from engine.advance(pool.samples)
        yield from pool.score(scorer, pool.samples)
        probe = pool.samples[0]
        p = pool.scores[probe.index]
        bin = policy.bin_of(p)
        sub = sub_config(config, policy, bin)
        yield DifficultyEstimated(bin, p, PROBE if sub is None else sub.strategy)
        if sub is None:
            yield pool.chosen(probe)
            return
    # The probe is sample 0; the chosen strategy's samples follow it.
    for ev in STRATEGIES[sub.strategy](engine, root, sub, scorer):
        yield dataclasses.replace(ev, sample=ev.sample + 1) if hasattr(ev, "sample") else ev  # type: ignore[type-var]
