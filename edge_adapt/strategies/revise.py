"""revise: sequential revisions (Snell et al. 2024). The budget is split into chains run side by side (their
lengths: StrategyConfig.chain_lengths), each a first attempt followed by revisions: before each new attempt the chain's context gets a user turn asking
to check and try again, so the model sees its earlier attempts (the MAX_IN_CONTEXT most recent). All chains
fork from the prompt's KV, decoded once; while a chain's window is not full each revision only appends to its
KV. The answer is the weighted best-of-N (summed p_keep per extracted answer) across every attempt."""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq
from typing import Any

from edge_adapt.engine.engine import Sample, Sequence
from edge_adapt.engine.events import Event
from edge_adapt.engine.steps import Decode
from edge_adapt.strategies.base import EngineLike, Pool, Scorer, require_scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import RoundStarted, StrategyEvent
from edge_adapt.strategies.extract import make_extractor
from edge_adapt.strategies.registry import ANSWERS, SCORED, StrategySpec, register
from edge_adapt.strategies.vote import choose_by_answer

MAX_IN_CONTEXT = 4  # earlier attempts a revision sees (Snell et al. keep the 4 most recent)
_MARK = "\u2063edge-adapt-attempt\u2063"


def revision_turn(engine: Any, message: str) -> list[int]:
    """The tokens between an attempt and the next: the end of the assistant turn, the user's request to
    revise, and the start of a new assistant turn, as the model's chat template writes them."""
    try:
        text = engine.chat_prompt([
            {"role": "user", "content": "question"}, {"role": "assistant", "content": _MARK},
            {"role": "user", "content": message},
        ])
        turn = text.split(_MARK, 1)[1]
    except (IndexError, ValueError):  # no usable template: plain text turns
        turn = f"\n\n{message}\n\n"
    return list(engine.tokenize(turn, special=True))


def response_tokens(s: Sample) -> list[int]:
    """What an attempt put into its KV: every generated token but a final end-of-generation one, and those of a
    stop string that ended it (the engine drops them)."""
    return list(s.generated[: len(s.generated) - s.dropped - (s.finish == "eos")])


def revise(engine: EngineLike, root: Sequence, config: StrategyConfig, scorer: Scorer | None) -> Iterator[Event | StrategyEvent]:
    scorer = require_scorer(scorer, "revise")
    turn = revision_turn(engine, config.revise_prompt)
    n_prompt = len(root.tokens)
    lengths = config.chain_lengths
    with Pool(engine, root, config) as pool:
        yield from pool.start(len(lengths), config.temperature)
        current = list(pool.samples)
        chains: list[list[Sample]] = [[s] for s in current]
        for r in range(lengths[0]):
            yield RoundStarted(r, len(current), config.temperature)
            yield from engine.steps(current)
            yield from pool.score(scorer, current)
            current = []
            for chain, length in zip(chains, lengths):
                if len(chain) == length:  # this chain's attempts are spent (the last round: every chain's)
                    continue
                last = chain[-1]
                seq = last.seq
                if len(chain) <= MAX_IN_CONTEXT:  # the window still holds every attempt: append
                    yield Decode.of([(seq, turn)])
                else:  # slide: the prompt's cells stay, the window's attempts are decoded again
                    engine.truncate(seq, n_prompt)
                    yield Decode.of([(seq, context_after_prompt(chain[-MAX_IN_CONTEXT:], turn))])
                yield from pool.follow(last, config.temperature)
                chain.append(pool.samples[-1])
                current.append(pool.samples[-1])
        attempts = [s for chain in chains for s in chain]
        extract = make_extractor(config.extractor, config.pattern)
        yield choose_by_answer(pool, attempts, extract, [pool.scores[s.index] for s in attempts])


def context_after_prompt(attempts: Seq[Sample], turn: Seq[int]) -> list[int]:
    """The tokens a chain's context holds after the prompt: each attempt followed by the revision turn."""
    out: list[int] = []
    for a in attempts:
        out += response_tokens(a) + list(turn)
    return out


def _tokens_in_context(config: StrategyConfig, model: Any) -> int:
    """A chain's sequence holds its current attempt and the earlier ones in its window, with the revision turn
    after each; the longest chain's window is the largest."""
    window = min(config.chain_lengths[0] - 1, MAX_IN_CONTEXT)
    return config.max_tokens + window * (config.max_tokens + len(revision_turn(model, config.revise_prompt)))


def _check(config: StrategyConfig) -> None:
    if config.budget < 2:
        raise ValueError("revise needs a budget of at least 2 (one attempt and one revision)")


register(StrategySpec("revise", revise, samples_at_once=lambda config: len(config.chain_lengths),
                      tokens_per_sequence=_tokens_in_context, check=_check,
                      reads=SCORED | ANSWERS | {"sequential_ratio", "revise_prompt"}))
