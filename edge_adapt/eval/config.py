"""EvalConfig: what `edge-adapt eval` and library callers pass to `run_eval` (pydantic: an edge)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from edge_adapt.backends import RemoteOptions

LiveStrategy = Literal["best-of-8", "adaptive"]
BACKEND_OPTIONS = ("backend_model", "backend_selfeval", "concurrency", "backend_wait", "backend_timeout")


class PoolSource(BaseModel):
    """What a sample pool is drawn from and how: the settings `eval`, `tune-policy` and `label` share."""

    model_config = ConfigDict(extra="forbid")

    suite: str = Field("arith", description="arith, gsm8k, mix (every task family), or a user suite .jsonl file")
    family: str | None = Field(None, description="one task family instead of a suite (edge_adapt.tasks.FAMILIES)")
    data: Path | None = Field(None, description="GSM8K's file for suite gsm8k, mix or family gsm8k (default "
                                                "../shared/data/gsm8k/train.jsonl), or suite jsonl's file; "
                                                "refused for any other suite")
    scorer: str | None = Field(None, description="user suites: final-number, stated-number, exact, regex:<pattern>, module:function")
    temperature: float = Field(0.7, description="sampling temperature of the pool (> 0)")
    max_tokens: int | None = Field(None, ge=1, description="most tokens per reply; default: each task family's own "
                                                           "(docs/tasks.md), 96 for other suites")
    seed: int = Field(0, ge=0, description="picks the arith problems and seeds every sample")
    model: Path | None = Field(None, description="GGUF model; the embedded default when omitted")
    threads: int | None = Field(None, ge=1)
    cache_dir: Path = Path("runs/eval-cache")
    backend: str | None = Field(None, description="an OpenAI-compatible server's URL to sample and score on instead "
                                                  "of in process (vLLM, llama-server, edge-adapt serve)")
    backend_model: str | None = Field(None, description="the server's model name (default: the one it serves)")
    backend_selfeval: str | None = Field(None, description="the server's self-eval model name (default: edge-adapt "
                                                           "serve's <model>:selfeval)")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight to the backend at once")
    backend_wait: float = Field(120.0, ge=0, description="seconds a backend request is retried (429, 5xx, a "
                                                         "restarting server) before the run stops")
    backend_timeout: float = Field(300.0, gt=0, description="seconds to wait for one answer before the run stops "
                                                            "(a server that queues requests past its slots)")

    def remote(self) -> RemoteOptions | None:
        """How to reach the backend server, or None to sample in process."""
        from edge_adapt.backends import RemoteOptions

        if self.backend is None:
            return None
        return RemoteOptions(url=self.backend, model=self.backend_model, selfeval_model=self.backend_selfeval,
                             concurrency=self.concurrency, give_up_s=self.backend_wait,
                             timeout_s=self.backend_timeout)

    @model_validator(mode="after")
    def _backend_options(self) -> PoolSource:
        if self.backend is None:
            read_only_with(self, BACKEND_OPTIONS, "--backend")
        return self

    @field_validator("temperature")
    @classmethod
    def _samples(cls, v: float) -> float:
        return pool_temperature(v)

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str | None) -> str | None:
        return known_family(v)


class EvalConfig(PoolSource):
    split: str = Field("test", description="arith split: train, validation or test")
    n_prompts: int = Field(200, ge=1)
    k: int = Field(16, ge=1, le=64, description="samples per prompt in the pool")
    prune_points: list[int] = Field(default_factory=lambda: [16, 32])
    adapter: Path | None = Field(None, description="self-eval LoRA adapter (GGUF)")
    default_adapter: bool = Field(True, description="the default model's shipped adapter when no adapter is given")
    selfeval: str = Field("edge_adapt.selfeval:SelfEvaluator",
                          description="module:Class of the self-evaluator, called as Class(engine, adapter_path=...)")
    out_dir: Path = Path("runs/eval")
    force: bool = Field(False, description="overwrite a non-empty out_dir")
    live: list[LiveStrategy] = Field(default_factory=list, description="strategies to also run for real")
    live_prompts: int = Field(30, ge=1)
    live_threshold: float | None = Field(None, description="adaptive threshold for --live; the pool's median end score when omitted")

    @field_validator("prune_points")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        return token_points(v, "--prune-at")

    @model_validator(mode="after")
    def _live_options(self) -> EvalConfig:
        if not self.live:
            read_only_with(self, ("live_prompts",), "--live")
        return self


def read_only_with(cfg: BaseModel, names: Iterable[str], flag: str) -> None:
    """Settings `names` of `cfg`, read only when `flag` is given: one given anyway (not its default) would be
    ignored in silence, so it is refused, named as its flag."""
    fields = type(cfg).model_fields
    for name in names:
        if name in fields and getattr(cfg, name) != fields[name].get_default(call_default_factory=True):
            raise ValueError(f"--{name.replace('_', '-')} is read only with {flag}")


def pool_temperature(v: float) -> float:
    """A pool samples (its greedy reply is drawn apart): a temperature in the sampling range, above 0. Said in
    one message here: the sampler's own allows 0 (greedy), which would point to a value refused next."""
    from edge_adapt.engine.sampling import SAMPLING_RULES

    if v == 0:
        raise ValueError(f"a pool samples: temperature must be > 0, got {v}")
    in_range, _, flag = SAMPLING_RULES["temperature"]
    if not in_range(v):
        raise ValueError(f"temperature ({flag}) must be a finite number in [1e-6, 100] (a pool samples: not 0), "
                         f"got {v}")
    return v


def known_family(name: str | None) -> str | None:
    """`name` if it is a task family (or None); else an error naming the families, before any model loads."""
    from edge_adapt.tasks import FAMILIES

    if name is not None and name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}: choose from {', '.join(FAMILIES)}")
    return name


def token_points(v: list[int], what: str) -> list[int]:
    """Token counts at which something happens (prune points, cuts): positive and strictly increasing."""
    if any(b <= a for a, b in zip(v, v[1:])) or any(p < 1 for p in v):
        raise ValueError(f"{what} must be positive and strictly increasing")
    return v
