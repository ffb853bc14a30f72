"""auto: compute-optimal test-time compute (Snell et al. 2024). One probe sample (counted in the budget) is
generated and scored; its p_keep puts the prompt in a difficulty bin, and the policy file says what to spend
there at this budget: nothing more (answer with the probe), or a strategy with its settings, run on the same
prompt KV. Easy prompts stop early, prompts the model cannot solve stop too, the rest get the search."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_adapt.engine.engine import Sequence
from edge_adapt.engine.events import Event, SampleStarted
from edge_adapt.errors import EdgeAdaptError, UsageError
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import DifficultyEstimated, StrategyEvent
from edge_adapt.strategies.policy import N_BINS, POLICY_OPTIONS, PROBE, Policy
from edge_adapt.strategies.registry import ANSWERS, STRATEGIES, StrategySpec, register


def policy_path(config: StrategyConfig) -> Path:
    if isinstance(config.policy, Path):
        return config.policy
    from edge_adapt.engine.default_model import default_policy

    shipped = default_policy()
    if shipped is None:
        raise UsageError("strategy 'auto' needs a policy file (--policy); none is shipped with this install")
    return shipped


def policy_of(config: StrategyConfig) -> Policy:
    """The policy loaded by `prepare`, or read from its file for a config that was not prepared."""
    return config.policy if isinstance(config.policy, Policy) else Policy.load(policy_path(config))


def prepare(config: StrategyConfig, model: Any) -> StrategyConfig:
    """Preflight: read the policy once and refuse it before anything is generated if it was tuned for another
    model or has no row for the budget; the run then uses the loaded policy."""
    try:
        policy = policy_of(config)
        policy.check_model(getattr(model, "fingerprint", policy.model))
    except EdgeAdaptError as exc:
        exc.field = "policy"
        raise
    try:
        policy.row_for(config.budget)
    except EdgeAdaptError as exc:
        exc.field = "budget"
        raise
    return config.model_copy(update={"policy": policy})


def check_scorer(config: StrategyConfig, scorer: Any) -> None:
    """Refuse the policy if it was tuned with another self-evaluation than `scorer`'s (its bins would mean
    nothing); a server checks it when a request comes, before its prompt is decoded."""
    try:
        policy_of(config).check_self_eval(scorer)
    except EdgeAdaptError as exc:
        exc.field = "policy"
        raise


# The settings a policy decides (its bins' options), by field name: the caller's do not reach a bin's choice.
SPENDING = frozenset(POLICY_OPTIONS & StrategyConfig.model_fields.keys())
DEFAULT_PRUNE_AT = StrategyConfig.model_fields["prune_at"].default


def sub_config(config: StrategyConfig, policy: Policy, bin: int) -> StrategyConfig | None:
    """The strategy the policy runs in this bin (None: answer with the probe), as it was tuned: the caller's own
    spending settings were for auto (its budget) or for strategies the caller names (a keep, a temperature);
    what to answer and how to judge it (max_tokens, stop, the scorer, the extractor) is the caller's. Its samples
    are seeded after the probe's."""
    row_budget, row = policy.row_for(config.budget)
    choice = row[bin - 1]
    if choice.strategy == PROBE:
        return None
    # A choice that names no budget spends the row's, less the probe.
    own = {k: v for k, v in choice.options.items() if k != "n"}  # `n` is the budget's other name
    options = {**config.model_dump(exclude_unset=True, exclude=SPENDING | {"policy"}), **own,
               "budget": choice.budget(row_budget), "strategy": choice.strategy, "seed": config.seed + 1}
    unpruned = STRATEGIES[choice.strategy].unpruned
    if unpruned is not None:
        # A prune point the replies never reach (the policy was tuned on longer ones) changes nothing: every
        # sample has finished there and the best one is kept. Without a point left, it is its unpruned twin.
        reached = [p for p in options.pop("prune_at", DEFAULT_PRUNE_AT) if p < config.max_tokens]
        if reached:
            options["prune_at"] = reached
        else:
            options["strategy"] = unpruned
    where = f"the policy's choice in bin {bin} at budget {row_budget} ({choice.describe()})"
    try:
        sub = StrategyConfig.parse(options)
    except UsageError as exc:
        raise UsageError(f"{where} cannot run here: {exc}", field="policy") from None
    # Loading the policy refuses such a choice; this holds for one it could not judge (a budget given as text)
    # or a Policy built without validation: auto never starts more than the caller's budget.
    if sub.budget > row_budget - 1:
        raise UsageError(f"{where} starts {sub.budget} samples after the probe; the row's budget leaves "
                         f"{row_budget - 1}", field="policy")
    return sub


def _choices(config: StrategyConfig) -> list[StrategyConfig]:
    """The strategies the policy may run at this budget, one per bin that does not stop at the probe."""
    policy = policy_of(config)
    return [s for s in (sub_config(config, policy, b) for b in range(1, N_BINS + 1)) if s is not None]


def samples_at_once(config: StrategyConfig) -> int:
    """The probe, or the most any bin's choice holds (the probe is given back before the choice runs)."""
    return max([1] + [STRATEGIES[s.strategy].samples_at_once(s) for s in _choices(config)])


def tokens_per_sequence(config: StrategyConfig, model: Any) -> int:
    return max([config.max_tokens] + [STRATEGIES[s.strategy].tokens_per_sequence(s, model)
                                      for s in _choices(config)])


def auto(engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None) -> Iterator[Event | StrategyEvent]:
    scorer = require_scorer(scorer, "auto")
    policy = policy_of(config)
    check_scorer(config, scorer)  # known here, not at `prepare`: a caller may bring its own
    row_budget = policy.row_for(config.budget)[0]
    with Pool(engine, root, config) as pool:
        yield from pool.start(1, policy.probe_temperature)
        yield from engine.steps(pool.samples)
        yield from pool.score(scorer, pool.samples)
        probe = pool.samples[0]
        p = pool.scores[probe.index]
        bin = policy.bin_of(p)
        sub = sub_config(config, policy, bin)
        yield DifficultyEstimated(bin, p, PROBE if sub is None else sub.strategy,
                                  None if row_budget == config.budget else row_budget)
        if sub is None:
            yield pool.chosen(probe)
            return
    for ev in STRATEGIES[sub.strategy].run(engine, root, sub, scorer):
        yield _after_probe(ev)


def _after_probe(ev: Any) -> Any:
    """The chosen strategy's event as auto streams it: the probe is sample 0, so every sample index it names is
    one more (a beam branch's parent too, or its text would be rebuilt from the wrong sample's). Decode requests
    pass as they are."""
    if isinstance(ev, SampleStarted) and ev.parent is not None:
        return dataclasses.replace(ev, sample=ev.sample + 1, parent=ev.parent + 1)
    return dataclasses.replace(ev, sample=ev.sample + 1) if hasattr(ev, "sample") else ev


# auto hands the caller's scorer, extractor, step delimiter and revision prompt on to its bins' choices; what
# spends compute there (the sampling settings too) is the policy's, so the caller's goes unread.
register(StrategySpec("auto", auto, samples_at_once=samples_at_once, tokens_per_sequence=tokens_per_sequence,
                      prepare=prepare, reads=ANSWERS | {"budget", "policy", "self_eval", "step_delimiter", "revise_prompt"}))
