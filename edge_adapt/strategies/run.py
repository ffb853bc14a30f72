"""run_strategy: the one entry point the CLI, the chat, eval and apps call. `plan_run` is its preflight: what a
run needs (sequences, tokens per sequence), worked out from the strategy's spec before anything is decoded, so
an engine can be sized for it (edge_adapt.sizing) and a run that cannot fit is refused at once. The stream
ends with Chosen, then Done(usage), the compute account built from the stream itself."""

from __future__ import annotations

import time
from contextlib import nullcontext
from collections.abc import Iterator, Mapping, Sequence as Seq
from dataclasses import dataclass
from typing import Any

from edge_adapt.engine.chat import Message
from edge_adapt.engine.events import Cancelled, Done, Event, Finished, SampleStarted, Token, Usage
from edge_adapt.engine.steps import Program, drive, watched
from edge_adapt.errors import BudgetError, ContextOverflowError, UsageError
from edge_adapt.strategies.base import EngineLike, Scorer
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import (
    Chosen, DifficultyEstimated, Pruned, RolledOut, RoundStarted, Scored, StrategyEvent,
)
from edge_adapt.strategies.registry import StrategySpec, spec_of

Prompt = str | Seq[Message] | Seq[int]
PROMPT_TYPES = "a prompt is a string, a list of chat messages or a list of token ids"


def prompt_tokens(model: Any, prompt: Prompt) -> list[int]:
    """A str is one user message and a list of dicts a conversation, both rendered with the model's chat
    template; a list of ints is used as it is. `model` is an Engine or a Vocab."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, (bytes, bytearray, memoryview)) or not isinstance(prompt, Seq):  # bytes iterate as ints
        raise UsageError(f"{PROMPT_TYPES}, got {type(prompt).__name__}")
    items = list(prompt)
    if not items:
        raise UsageError("empty prompt")
    if all(isinstance(t, int) for t in items):
        return items  # type: ignore[return-value]
    if all(isinstance(m, dict) for m in items):
        return model.chat_tokens(items)
    raise UsageError(PROMPT_TYPES)


@dataclass(frozen=True)
class RunPlan:
    """What one strategy run on one prompt needs."""

    spec: StrategySpec
    config: StrategyConfig  # as prepared by the spec (auto: its policy loaded)
    prompt: list[int]
    samples: int  # samples held at the same time
    span: int  # the most tokens generated into one sequence
    suffix: int  # self-evaluation suffix tokens decoded after a sample (0 without a scorer)

    @property
    def sequences(self) -> int:
        """Engine sequences: the samples and the prompt's own."""
        return self.samples + 1

    @property
    def tokens_per_sequence(self) -> int:
        return len(self.prompt) + self.span + self.suffix


def plan_run(model: Any, prompt: Prompt | None, config: StrategyConfig, *, suffix: int | None = None) -> RunPlan:
    """The preflight of a run: `model` is the Engine it will run on, or a Vocab when the engine is still to be
    sized. `suffix` is the length of the scorer's suffix; when omitted it is the self-evaluation suffix the
    model (and config.self_eval) gives. Either counts only for strategies that score. With no prompt (a chat
    planning for turns to come) the plan's prompt is empty and `tokens_per_sequence` is the room a turn needs
    after it."""
    spec = spec_of(config.strategy)
    config = spec.prepare(config, model)
    tokens = prompt_tokens(model, prompt) if prompt is not None else []
    if not spec.needs_scorer:
        suffix = 0
    elif suffix is None:
        from edge_adapt.selfeval import suffix_tokens

        suffix = len(suffix_tokens(model, config.self_eval))
    return RunPlan(spec, config, tokens, spec.samples_at_once(config), spec.tokens_per_sequence(config, model), suffix)


def run_strategy(
    engine: EngineLike, prompt: Prompt, config: StrategyConfig | Mapping[str, Any], scorer: Scorer | None = None, *,
    root: Any = None, unread_ok: bool = False,
) -> Iterator[Event | StrategyEvent]:
    """Run `config.strategy` on the prompt (`config` may be a StrategyConfig's fields as a dict). Without a
    scorer, strategies that need one get a `SelfEvaluator(engine, config.self_eval)`. The stream ends with a
    Chosen event, then Done(usage). An option the caller set that the strategy does not read is refused, as
    every front end refuses it, unless `unread_ok` (a chat keeps settings for strategies it may switch to).

    `root`, when given, is an already decoded sequence holding the prompt (a chat keeps its conversation
    there): samples fork from it and it is left as it was, instead of decoding the prompt into a new one.

    Configuration problems (unknown strategy, too few sequences, a context too short) raise here, before
    anything is decoded; the returned iterator does the work, each of its decodes at once (`drive`); a
    scheduler drives `strategy_steps` itself, batching its decodes with other requests'.
    """
    config = StrategyConfig.from_caller(config, "config", unread_ok=unread_ok)
    if prompt is None and root is None:  # plan_run reads None as a chat planning for turns to come
        raise UsageError(f"{PROMPT_TYPES}, got None")
    if scorer is not None and not (callable(getattr(scorer, "steps", None)) and hasattr(scorer, "decoded_tokens")):
        raise UsageError(f"scorer must be a SelfEvaluator or have steps(samples) and decoded_tokens (the Scorer "
                         f"protocol), got {type(scorer).__name__}")
    if scorer is None and spec_of(config.strategy).needs_scorer:
        from edge_adapt.selfeval import SelfEvaluator

        scorer = SelfEvaluator(engine, config.self_eval)  # type: ignore[arg-type]
    n_suffix = len(getattr(scorer, "suffix", ())) if scorer is not None else None
    plan = plan_run(engine, list(root.tokens) if root is not None else prompt, config, suffix=n_suffix)
    check_fits(plan, engine.n_ctx_seq)
    if plan.samples + (root is None) > engine.free_sequences:
        raise BudgetError(
            f"strategy {config.strategy} with budget {config.budget} runs {plan.samples} samples at once and needs "
            f"{plan.samples + 1} free sequences (one for the prompt); the engine has {engine.free_sequences}"
        )
    return _as_one_work(engine, drive(engine, strategy_steps(engine, plan, scorer, root)))


def _as_one_work(engine: EngineLike, events: Iterator[Any]) -> Iterator[Any]:
    """The run holds the engine busy from its first event to its last, so that `engine.cancel()` ends the whole
    run (its next decode raises Cancelled, or its answer does where nothing is left to decode: strategy_steps;
    every sequence is given back), not only the step it lands in."""
    busy = getattr(engine, "busy", None)  # an Engine; a stand-in engine has no cancel to hold
    with busy() if busy is not None else nullcontext():
        yield from events


def check_fits(plan: RunPlan, n_ctx_seq: int, *, client: bool = False) -> None:
    """Refuse a plan whose longest sequence would not fit the context of one sequence. `client`: said to a
    server's client, who cannot raise the server's --ctx but can send less or ask for fewer tokens."""
    if len(plan.prompt) >= n_ctx_seq:  # no max_tokens or budget would help
        remedy = ": send a shorter prompt" if client else " (raise --ctx or shorten the prompt)"
        raise ContextOverflowError(f"the prompt alone ({len(plan.prompt)} tokens) fills the context of {n_ctx_seq} "
                                   f"per sequence{remedy}")
    if plan.tokens_per_sequence > n_ctx_seq:
        attempts = plan.span != plan.config.max_tokens  # revise keeps earlier attempts; the budget sets how many
        if client:
            lower = "max_tokens or edge_adapt.budget" if attempts else "max_tokens"
            remedy = f": send a shorter prompt or a lower {lower}"
        else:
            remedy = f" (raise --ctx or lower max_tokens{' or --budget' if attempts else ''})"
        raise ContextOverflowError(
            f"prompt ({len(plan.prompt)}) + {'attempts in context' if attempts else 'max_tokens'} ({plan.span}) + "
            f"self-eval suffix ({plan.suffix}) = {plan.tokens_per_sequence} tokens exceed the context of "
            f"{n_ctx_seq} per sequence{remedy}"
        )


def strategy_steps(
    engine: EngineLike, plan: RunPlan, scorer: Scorer | None, given_root: Any = None, *, reused: int = 0
) -> Program[None]:
    """The step program of a planned run (edge_adapt.engine.steps): the strategy's events and decode requests,
    then Done(usage), the compute account built from the events. `given_root` holds the decoded prompt and is
    left as it was (a chat's conversation, a server's prefix cache entry); without it the prompt is opened
    for this run. `reused`: prompt tokens that were already in the KV."""
    t0 = time.perf_counter()
    calls0 = engine.decode_calls
    se0 = scorer.decoded_tokens if scorer is not None else 0
    counts = {SampleStarted: 0, Token: 0, Scored: 0, Pruned: 0, RoundStarted: 0}
    rollout = 0
    difficulty = None
    cancelled = False

    def see(ev: object) -> None:
        nonlocal rollout, difficulty, cancelled
        if type(ev) in counts:
            counts[type(ev)] += 1
        elif isinstance(ev, RolledOut):
            rollout += ev.n_tokens
        elif isinstance(ev, DifficultyEstimated):
            difficulty = ev.bin
        elif isinstance(ev, Finished) and ev.reason == "cancelled":
            cancelled = True
        elif isinstance(ev, Chosen) and cancelled:
            # engine.cancel() ended the samples, and a strategy that decodes nothing after them (single, vote) was
            # about to answer with one cut short: the run is cancelled as a whole, as where a later decode raises.
            raise Cancelled()

    with nullcontext(given_root) if given_root is not None else engine.opened(plan.prompt) as root:
        yield from watched(plan.spec.run(engine, root, plan.config, scorer), see)
    extra = {"scores": float(counts[Scored])}
    if counts[RoundStarted]:
        extra["rounds"] = float(counts[RoundStarted])
    if rollout:
        extra["rollout_tokens"] = float(rollout)  # part of generated_tokens (a roll-out's tokens are not streamed)
    if difficulty is not None:
        extra["difficulty_bin"] = float(difficulty)
    yield Done(
        Usage(
            prompt_tokens=len(plan.prompt),
            prompt_tokens_reused=reused,
            generated_tokens=counts[Token] + rollout,
            selfeval_tokens=(scorer.decoded_tokens - se0) if scorer is not None else 0,
            samples_started=counts[SampleStarted],
            samples_pruned=counts[Pruned],
            decode_calls=engine.decode_calls - calls0,
            wall_s=time.perf_counter() - t0,
            extra=extra,
        )
    )
