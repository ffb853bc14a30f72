"""A validated request as a scheduler Job: its prompt tokens, one SamplingParams per choice, or a strategy run."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from edge_adapt.engine.sampling import SAMPLING_RULES, SamplingParams, check_bias_vocabulary
from edge_adapt.errors import ContextOverflowError, UsageError, one_line, validated
from edge_adapt.server.openai_errors import APIError, bad_request, lone_surrogate
from edge_adapt.server.scheduler import Job
from edge_adapt.server.schemas import ChatCompletionRequest, CompletionRequest, EdgeAdaptOptions
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.policy import Policy

Request = ChatCompletionRequest | CompletionRequest
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")


@dataclass(frozen=True)
class ScoringModel:
    """The self-evaluation the server offers as a model of its own (`<model>:selfeval`), as vLLM serves a LoRA
    adapter under its own name: a completions request whose prompt ends with the self-eval suffix gets the
    next token's log-probabilities with the adapter on for the suffix's last `adapter_tail` tokens."""

    id: str
    suffix: tuple[int, ...]
    adapter_tail: int
    yes_token: int
    no_token: int
    adapter: str | None  # the adapter file's name; None: the base model judges itself
    adapter_sha256: str | None = None  # its content's hash (the first 16 hex digits): what a client's cache keys

    def card(self) -> dict[str, Any]:
        return {"suffix_ids": list(self.suffix), "adapter_tail": self.adapter_tail, "yes_token": self.yes_token,
                "no_token": self.no_token, "adapter": self.adapter, "adapter_sha256": self.adapter_sha256}


@dataclass(frozen=True)
class Plan:
    job: Job
    n: int  # choices to return (a strategy may return fewer: pruned samples are never returned)
    strategy: str | None
    top_logprobs: int | None


def chat_tokens(engine: Any, messages: list[dict[str, str]]) -> list[int]:
    """A conversation rendered with the model's chat template, as `edge-adapt run` and `chat` render it."""
    return _fitting(engine, lambda most: engine.chat_tokens(messages, most=most))


def _fitting(engine: Any, tokenize: Callable[[int], list[int]]) -> list[int]:
    """A prompt's tokens, refused as soon as it is known not to fit a sequence beside one generated token: a long
    prompt is not tokenized to its end just to be refused."""
    try:
        return tokenize(engine.n_ctx_seq - 1)
    except ContextOverflowError as exc:
        raise ContextOverflowError(f"the prompt does not fit the context of {engine.n_ctx_seq} tokens per "
                                   f"sequence: {exc}") from None


def completion_tokens(engine: Any, prompt: str | list[int]) -> list[int]:
    """A raw prompt with the model's BOS, as `edge-adapt run --raw` tokenizes it; token ids are taken as they
    are (the client tokenized them, BOS included if it wants one) once each is known to the vocabulary."""
    if isinstance(prompt, list):
        n_vocab = engine.model.n_vocab
        bad = next((t for t in prompt if t >= n_vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is not in the model's vocabulary of {n_vocab}", "prompt")
        return list(prompt)
    return _fitting(engine, lambda most: engine.tokenize(prompt, add_bos=True, most=most))


def sampling_values(req: Request) -> dict[str, float]:
    """The sampling fields the request gave, checked against the library's one declaration of their ranges."""
    values = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    for name, value in values.items():
        ok, rule, _flag = SAMPLING_RULES[name]
        if not ok(value):
            raise bad_request(f"{name} must be {rule}, got {value}", name)
    return values


def resolve_seed(seed: int | None) -> int:
    """Absent (or -1, as llama.cpp's server spells it): a fresh random seed, so replies differ."""
    return secrets.randbelow(2**31) if seed is None or seed == -1 else seed


def plan_job(req: Request, prompt: list[int], *, n_ctx_seq: int, capacity: int, n_vocab: int,
             scoring: ScoringModel | None = None) -> Plan:
    """The Job for `req` on an engine of `capacity` sequences of `n_ctx_seq` tokens and a vocabulary of
    `n_vocab` (`scoring`: the request names the self-eval model). Only checks that need the request's own fields
    are made here; the scheduler refuses what does not fit (context, sequences) itself."""
    values = sampling_values(req)
    seed = resolve_seed(req.seed)
    limit = req.token_limit
    base = SamplingParams(**values, seed=seed, logit_bias=req.logit_bias)  # type: ignore[arg-type]
    if scoring is not None:
        return _scoring_plan(req, prompt, scoring, base)
    if req.edge_adapt is not None:
        if req.top_alternatives is not None:
            raise bad_request("logprobs are not available with an edge_adapt strategy", "logprobs")
        if base.logit_bias:
            raise bad_request("logit_bias is not available with an edge_adapt strategy", "logit_bias")
        cfg = strategy_config(req.edge_adapt, values, seed=seed, max_tokens=limit, stop=req.stops)
        return Plan(Job(prompt=prompt, max_tokens=cfg.max_tokens, stop=cfg.stop, strategy=cfg), req.n,
                    cfg.strategy, None)
    if req.n > capacity:
        raise bad_request(f"n ({req.n}) is more than this server runs at once ({capacity} sequences)", "n")
    try:
        check_bias_vocabulary([base], n_vocab)
    except UsageError as exc:
        raise bad_request(str(exc), "logit_bias") from None
    # OpenAI's chat default: until the context is full.
    max_tokens = limit if limit is not None else max(1, n_ctx_seq - len(prompt))
    samples = tuple(replace(base, seed=seed + i) for i in range(req.n))  # choice i uses seed + i
    job = Job(prompt=prompt, max_tokens=max_tokens, samples=samples, stop=req.stops, top_logprobs=req.top_alternatives)
    return Plan(job, req.n, None, req.top_alternatives)


def _scoring_plan(req: Request, prompt: list[int], scoring: ScoringModel, params: SamplingParams) -> Plan:
    """A self-eval request: one token after prompt + suffix, its log-probabilities being the answer."""
    if req.edge_adapt is not None:
        raise bad_request(f"the self-eval model {scoring.id} runs no strategy", "edge_adapt")
    if req.n != 1:
        raise bad_request(f"the self-eval model {scoring.id} answers one choice (n: 1)", "n")
    if req.token_limit != 1:
        raise bad_request(f"the self-eval model {scoring.id} answers one token (max_tokens: 1)", "max_tokens")
    if req.top_alternatives is None or req.top_alternatives < 2:
        raise bad_request(f"the self-eval model {scoring.id} answers with log-probabilities: ask for logprobs >= 2",
                          "logprobs")
    n = len(scoring.suffix)
    if len(prompt) <= n or tuple(prompt[-n:]) != scoring.suffix:
        raise bad_request(f"a prompt for the self-eval model {scoring.id} ends with its suffix, the {n} token ids "
                          "listed under edge_adapt.suffix_ids in GET /v1/models", "prompt")
    job = Job(prompt=prompt, max_tokens=1, samples=(params,), top_logprobs=req.top_alternatives,
              adapter_tail=scoring.adapter_tail)
    return Plan(job, 1, None, req.top_alternatives)


def strategy_config(opts: EdgeAdaptOptions, sampling: dict[str, float], *, seed: int, max_tokens: int | None,
                    stop: tuple[str, ...]) -> StrategyConfig:
    """The `edge_adapt` object and the request's sampling fields as a StrategyConfig, with `edge-adapt run`'s
    names and checks; what the request leaves out keeps StrategyConfig's defaults."""
    try:
        policy = validated(Policy, opts.policy, "edge_adapt.policy") if opts.policy is not None else None
    except UsageError as exc:
        raise bad_request(str(exc), "edge_adapt.policy") from None
    except UnicodeEncodeError:  # a refusal that quotes a lone surrogate
        raise lone_surrogate(opts.policy, "edge_adapt.policy") from None
    prune_at = (opts.prune_at,) if isinstance(opts.prune_at, int) else opts.prune_at
    data: dict[str, Any] = {
        "strategy": opts.strategy, "budget": opts.budget, "threshold": opts.threshold, "keep": opts.keep,
        "prune_at": tuple(prune_at) if prune_at is not None else None, "policy": policy,
        "beam_width": opts.beam_width, "max_step_tokens": opts.max_step_tokens, "lookahead": opts.lookahead,
        "sequential_ratio": opts.sequential_ratio, **sampling, "seed": seed, "max_tokens": max_tokens,
        "stop": stop or None,
    }
    try:
        cfg = StrategyConfig.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        # Named as the request names it: `edge_adapt.budget`, or `temperature` for a sampling field; a check
        # across fields (keep <= budget) names the object.
        loc = exc.errors()[0]["loc"]
        field = str(loc[0]) if loc else None
        param = f"edge_adapt.{field}" if field in EdgeAdaptOptions.model_fields else field or "edge_adapt"
        raise APIError(400, one_line(exc, "edge_adapt"), param=param) from None
    except UnicodeEncodeError:
        raise lone_surrogate(opts.model_dump(exclude={"policy"}), "edge_adapt") from None
    # What the strategy would ignore in silence is refused, as `edge-adapt run` refuses its flags: each option by
    # its name in the request (`keep` is StrategyConfig's `k`).
    given = {("k" if name == "keep" else name): f"edge_adapt.{name}"
             for name in type(opts).model_fields if name != "strategy" and getattr(opts, name) is not None}
    given.update({name: name for name in sampling})
    unread = [given[field] for field in cfg.unread(given)]
    if unread:
        raise bad_request(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not used by strategy "
                          f"{cfg.strategy}", unread[0])
    return cfg
