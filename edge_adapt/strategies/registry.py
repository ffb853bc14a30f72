"""STRATEGIES: name -> strategy function (engine, root sequence, config, scorer) -> event iterator."""

from __future__ import annotations

from edge_adapt.strategies.adaptive import adaptive, adaptive_prune, round_sizes
from edge_adapt.strategies.auto import auto, policy_path, sub_config
from edge_adapt.strategies.base import StrategyFn
from edge_adapt.strategies.beam import beam
from edge_adapt.strategies.best_of_n import best_of_n
from edge_adapt.strategies.config import STRATEGY_NAMES, StrategyConfig
from edge_adapt.strategies.lookahead import lookahead
from edge_adapt.strategies.policy import Policy
from edge_adapt.strategies.prune import prune
from edge_adapt.strategies.revise import MAX_IN_CONTEXT, revise
from edge_adapt.strategies.single import single
from edge_adapt.strategies.vote import vote, weighted_vote

STRATEGIES: dict[str, StrategyFn] = {
    "single": single,
    "best-of-n": best_of_n,
    "adaptive": adaptive,
    "prune": prune,
    "adaptive+prune": adaptive_prune,
    "vote": vote,
    "weighted-vote": weighted_vote,
    "weighted-best-of-n": weighted_vote,  # Snell et al.'s name for the same rule
    "beam": beam,
    "lookahead": lookahead,
    "revise": revise,
    "auto": auto,
}
assert tuple(STRATEGIES) == STRATEGY_NAMES

# Strategies that cannot run without a self-evaluation scorer (single scores only when given one).
NEEDS_SCORER = frozenset(set(STRATEGY_NAMES) - {"single", "vote"})


def samples_at_once(config: StrategyConfig) -> int:
    """The most samples a run holds at the same time (the engine needs one more sequence for the prompt)."""
    if config.strategy == "single":
        return 1
    if config.strategy in ("adaptive", "adaptive+prune"):
        return max(round_sizes(config.budget))
    if config.strategy == "lookahead":
        return 2 * config.budget  # every beam and its roll-out
    if config.strategy == "revise":
        return config.chains
    if config.strategy == "auto":
        policy = Policy.load(policy_path(config))
        subs = [sub_config(config, policy, b) for b in range(1, 6)]
        return max([1] + [samples_at_once(s) for s in subs if s is not None])
    return config.budget


def tokens_per_sequence(config: StrategyConfig, revision_turn: int = 64) -> int:
    """The most generated tokens one sequence holds: revise keeps earlier attempts (and the turns between
    them) in context; `revision_turn` bounds the tokens of one turn."""
    if config.strategy == "revise":
        window = min(config.chain_length - 1, MAX_IN_CONTEXT)
        return config.max_tokens + window * (config.max_tokens + revision_turn)
    return config.max_tokens
