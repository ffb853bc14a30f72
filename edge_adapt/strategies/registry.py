"""The strategy registry. Each strategy module declares one `StrategySpec` beside its code and registers it
here; this module imports no strategy (importing the `edge_adapt.strategies` package imports them all, and
Python runs that package first whenever any of its modules is imported, so the registry is always full)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_adapt.errors import UsageError

if TYPE_CHECKING:
    from edge_adapt.strategies.base import StrategyFn
    from edge_adapt.strategies.config import StrategyConfig


def _budget(config: StrategyConfig) -> int:
    return config.budget


def _max_tokens(config: StrategyConfig, model: Any) -> int:
    return config.max_tokens


def _no_check(config: StrategyConfig) -> None:
    return None


def _as_is(config: StrategyConfig, model: Any) -> StrategyConfig:
    return config


# Options only some strategies read, in the groups `StrategySpec.reads` is made of. Every strategy reads the rest
# (strategy, max_tokens, stop, seed); what a strategy does not read, a front end refuses rather than ignore.
SAMPLING = frozenset({"temperature", "top_k", "top_p", "min_p", "repeat_penalty"})
SCORED = SAMPLING | {"budget", "self_eval"}
PRUNING = frozenset({"k", "prune_threshold", "prune_at"})
ROUNDS = frozenset({"threshold", "schedule", "t_min", "t_max"})  # adaptive: temperature only on the constant schedule
ANSWERS = frozenset({"extractor", "pattern"})
STEPS = SCORED | ANSWERS | {"beam_width", "max_step_tokens", "step_delimiter", "max_rounds"}


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy is and what it needs, declared where it is written.

    - `run(engine, root, config, scorer)` streams its events and ends with a Chosen event.
    - `samples_at_once(config)`: the most sequences a run holds at the same time, the prompt's not counted.
    - `tokens_per_sequence(config, model)`: the most tokens generated into one sequence (revise keeps earlier
      attempts, and the turns between them that the model's chat template writes, in context).
    - `check(config)`: settings that only this strategy constrains; raises ValueError with a one-line reason.
    - `prepare(config, model)`: preflight against the model before anything is decoded (auto loads and checks
      its policy once here); returns the config the run uses.
    - `unpruned`: a strategy that prunes at token counts (`prune_at`) names the strategy it is when replies end
      before every prune point (`auto` runs a policy's choice that way when the caller's replies are shorter than
      those it was tuned on).
    - `reads`: the StrategyConfig options it reads of those only some strategies read (the groups above);
      `StrategyConfig.unread` names the others a caller set, which front ends refuse.
    """

    name: str
    run: StrategyFn
    needs_scorer: bool = True
    samples_at_once: Callable[[StrategyConfig], int] = _budget
    tokens_per_sequence: Callable[[StrategyConfig, Any], int] = _max_tokens
    check: Callable[[StrategyConfig], None] = _no_check
    prepare: Callable[[StrategyConfig, Any], StrategyConfig] = _as_is
    reads: frozenset[str] = SCORED
    aliases: tuple[str, ...] = ()
    unpruned: str | None = None


STRATEGIES: dict[str, StrategySpec] = {}  # every name (aliases too) -> its spec, in registration order


def register(spec: StrategySpec) -> StrategySpec:
    for name in (spec.name, *spec.aliases):
        if name in STRATEGIES:
            raise RuntimeError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = spec
    return spec


def names() -> tuple[str, ...]:
    return tuple(STRATEGIES)


def spec_of(name: str) -> StrategySpec:
    spec = STRATEGIES.get(name)
    if spec is None:
        raise UsageError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return spec
