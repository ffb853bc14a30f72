"""A validated request as a scheduler Job: its prompt tokens, one SamplingParams per choice, or a strategy run."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any

from edge_adapt.engine.sampling import SAMPLING_RULES, SamplingParams
from edge_adapt.errors import UsageError, validated
from edge_adapt.server.openai_errors import APIError, bad_request
from edge_adapt.server.scheduler import Job
from edge_adapt.server.schemas import ChatCompletionRequest, CompletionRequest, EdgeAdaptOptions
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.policy import Policy

Request = ChatCompletionRequest | CompletionRequest
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")


@dataclass(frozen=True)
class Plan:
    job: Job
    n: int  # choices to return (a strategy may return fewer: pruned samples are never returned)
    strategy: str | None
    top_logprobs: int | None


def chat_tokens(engine: Any, messages: list[dict[str, str]]) -> list[int]:
    """A conversation rendered with the model's chat template, as `edge-adapt run` and `chat` render it."""
    return engine.tokenize(engine.chat_prompt(messages), special=True)


def completion_tokens(engine: Any, prompt: str) -> list[int]:
    """A raw prompt with the model's BOS, as `edge-adapt run --raw` tokenizes it."""
    return engine.tokenize(prompt, add_bos=True)


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


def plan_job(req: Request, prompt: list[int], *, n_ctx_seq: int, capacity: int) -> Plan:
    """The Job for `req` on an engine of `capacity` sequences of `n_ctx_seq` tokens. Only checks that need the
    request's own fields are made here; the scheduler refuses what does not fit (context, sequences) itself."""
    values = sampling_values(req)
    seed = resolve_seed(req.seed)
    limit = req.token_limit
    if req.edge_adapt is not None:
        if req.top_alternatives is not None:
            raise bad_request("logprobs are not available with an edge_adapt strategy", "logprobs")
        cfg = strategy_config(req.edge_adapt, values, seed=seed, max_tokens=limit, stop=req.stops)
        return Plan(Job(prompt=prompt, max_tokens=cfg.max_tokens, stop=cfg.stop, strategy=cfg), req.n,
                    cfg.strategy, None)
    if req.n > capacity:
        raise bad_request(f"n ({req.n}) is more than this server runs at once ({capacity} sequences)", "n")
    # OpenAI's chat default: until the context is full.
    max_tokens = limit if limit is not None else max(1, n_ctx_seq - len(prompt))
    base = SamplingParams(**values, seed=seed)  # type: ignore[arg-type]
    samples = tuple(replace(base, seed=seed + i) for i in range(req.n))  # choice i uses seed + i
    job = Job(prompt=prompt, max_tokens=max_tokens, samples=samples, stop=req.stops, top_logprobs=req.top_alternatives)
    return Plan(job, req.n, None, req.top_alternatives)


def strategy_config(opts: EdgeAdaptOptions, sampling: dict[str, float], *, seed: int, max_tokens: int | None,
                    stop: tuple[str, ...]) -> StrategyConfig:
    """The `edge_adapt` object and the request's sampling fields as a StrategyConfig, with `edge-adapt run`'s
    names and checks; what the request leaves out keeps StrategyConfig's defaults."""
    try:
        policy = validated(Policy, opts.policy, "edge_adapt.policy") if opts.policy is not None else None
    except UsageError as exc:
        raise bad_request(str(exc), "edge_adapt.policy") from None
    prune_at = (opts.prune_at,) if isinstance(opts.prune_at, int) else opts.prune_at
    data: dict[str, Any] = {
        "strategy": opts.strategy, "budget": opts.budget, "threshold": opts.threshold, "k": opts.keep,
        "prune_at": tuple(prune_at) if prune_at is not None else None, "policy": policy,
        "beam_width": opts.beam_width, "max_step_tokens": opts.max_step_tokens, "lookahead": opts.lookahead,
        "sequential_ratio": opts.sequential_ratio, **sampling, "seed": seed, "max_tokens": max_tokens,
        "stop": stop or None,
    }
    try:
        return StrategyConfig.parse({k: v for k, v in data.items() if v is not None}, "edge_adapt")
    except UsageError as exc:
        raise APIError(400, str(exc), param="edge_adapt") from None
