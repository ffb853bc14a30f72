"""run_strategy: the one entry point the CLI and apps call. Opens the prompt, runs a strategy, streams its
events and ends with Done(usage), the compute account built from the stream itself."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence as Seq
from typing import Any

from edge_adapt.engine.chat import Message
from edge_adapt.engine.events import Done, Event, SampleStarted, Token, Usage
from edge_adapt.errors import BudgetError, ContextOverflowError, UsageError
from edge_adapt.strategies.base import EngineLike, Scorer, StrategyFn
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import DifficultyEstimated, Pruned, RolledOut, RoundStarted, Scored, StrategyEvent
from edge_adapt.strategies.registry import NEEDS_SCORER, STRATEGIES, samples_at_once, tokens_per_sequence
from edge_adapt.strategies.revise import revision_turn

Prompt = str | Seq[Message] | Seq[int]


def prompt_tokens(engine: Any, prompt: Prompt) -> list[int]:
    """A str is one user message and a list of dicts a conversation, both rendered with the model's chat
    template; a list of ints is used as it is."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    items = list(prompt)
    if not items:
        raise UsageError("empty prompt")
    if all(isinstance(t, int) for t in items):
        return items  # type: ignore[return-value]
    if all(isinstance(m, dict) for m in items):
        return engine.tokenize(engine.chat_prompt(items), special=True)
    raise UsageError("a prompt is a string, a list of chat messages or a list of token ids")


def run_strategy(
    engine: EngineLike, prompt: Prompt, config: StrategyConfig, scorer: Scorer | None = None, *, root: Any = None
) -> Iterator[Event | StrategyEvent]:
    """Run `config.strategy` on the prompt. Without a scorer, strategies that need one get a
    `SelfEvaluator(engine, config.self_eval)`. The stream ends with a Chosen event, then Done(usage).

    `root`, when given, is an already decoded sequence holding the prompt (a chat keeps its conversation
    there): samples fork from it and it is left as it was, instead of decoding the prompt into a new one.

    Configuration problems (unknown strategy, too few sequences, a context too short) raise here, before
    anything is decoded; the returned iterator does the work.
    """
    fn = STRATEGIES.get(config.strategy)
    if fn is None:
        raise UsageError(f"unknown strategy {config.strategy!r} (choose from {', '.join(STRATEGIES)})")
    tokens = list(root.tokens) if root is not None else prompt_tokens(engine, prompt)
    if scorer is None and config.strategy in NEEDS_SCORER:
        from edge_adapt.selfeval import SelfEvaluator

        scorer = SelfEvaluator(engine, config.self_eval)  # type: ignore[arg-type]
    if config.strategy == "auto":
        from edge_adapt.strategies.auto import checked_policy

        checked_policy(config, engine)
    n_suffix = len(getattr(scorer, "suffix", ())) if scorer is not None else 0
    turn = len(revision_turn(engine, config.revise_prompt)) if config.strategy == "revise" else 0
    span = tokens_per_sequence(config, turn)
    need = len(tokens) + span + n_suffix
    if need > engine.n_ctx_seq:
        what = "max_tokens" if span == config.max_tokens else "attempts in context"
        raise ContextOverflowError(
            f"prompt ({len(tokens)}) + {what} ({span}) + self-eval suffix ({n_suffix}) = {need} "
            f"tokens exceed the context of {engine.n_ctx_seq} per sequence (raise --ctx or lower max_tokens)"
        )
    at_once = samples_at_once(config)
    if at_once + (root is None) > engine.free_sequences:
        raise BudgetError(
            f"strategy {config.strategy} with budget {config.budget} runs {at_once} samples at once and needs "
            f"{at_once + 1} free sequences (one for the prompt); the engine has {engine.free_sequences}"
        )
    return _stream(engine, tokens, config, scorer, fn, root)


def _stream(
    engine: EngineLike, tokens: list[int], config: StrategyConfig, scorer: Scorer | None, fn: StrategyFn,
    given_root: Any = None,
) -> Iterator[Event | StrategyEvent]:
    t0 = time.perf_counter()
    calls0 = engine.decode_calls
    se0 = scorer.decoded_tokens if scorer is not None else 0
    started = generated = pruned = scored = rounds = rollout = 0
    difficulty = None
    root = given_root if given_root is not None else engine.open(tokens)
    events: Iterator[Event | StrategyEvent] | None = None
    try:
        events = fn(engine, root, config, scorer)
        for ev in events:
            if isinstance(ev, Token):
                generated += 1
            elif isinstance(ev, SampleStarted):
                started += 1
            elif isinstance(ev, Scored):
                scored += 1
            elif isinstance(ev, Pruned):
                pruned += 1
            elif isinstance(ev, RoundStarted):
                rounds += 1
            elif isinstance(ev, RolledOut):
                rollout += ev.n_tokens
            elif isinstance(ev, DifficultyEstimated):
                difficulty = ev.bin
            yield ev
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # a consumer that stops early still gets every sequence back
        if given_root is None:
            engine.release(root)
    extra = {"scores": float(scored)}
    if rounds:
        extra["rounds"] = float(rounds)
    if rollout:
        extra["rollout_tokens"] = float(rollout)  # already part of generated_tokens
    if difficulty is not None:
        extra["difficulty_bin"] = float(difficulty)
    yield Done(
        Usage(
            prompt_tokens=len(tokens),
            generated_tokens=generated,
            selfeval_tokens=(scorer.decoded_tokens - se0) if scorer is not None else 0,
            samples_started=started,
            samples_pruned=pruned,
            decode_calls=engine.decode_calls - calls0,
            wall_s=time.perf_counter() - t0,
            extra=extra,
        )
    )
