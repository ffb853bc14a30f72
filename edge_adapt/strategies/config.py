"""StrategyConfig: every option of every strategy, checked once at the edge (CLI flags, TOML/JSON files)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_adapt.errors import validated
from edge_adapt.selfeval.config import SelfEvalConfig, load_mapping

STRATEGY_NAMES = (
    "single", "best-of-n", "adaptive", "prune", "adaptive+prune", "vote", "weighted-vote",
    "weighted-best-of-n", "beam", "lookahead", "revise", "auto",
)
PRUNING = ("prune", "adaptive+prune")
STEP_SEARCH = ("beam", "lookahead")
DEFAULT_REVISE_PROMPT = "Check your answer step by step. If it is wrong, give a corrected answer; if it is right, give it again."


class StrategyConfig(BaseModel):
    """How to spend inference-time compute on one prompt. Loadable from TOML/JSON (`from_file`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    strategy: str = Field("single", description=f"one of {', '.join(STRATEGY_NAMES)}")
    budget: int = Field(
        8, ge=1, le=255, validation_alias=AliasChoices("budget", "n"),
        description="samples: N of best-of-n / prune / votes, the most an adaptive run may start",
    )
    # 0.5: "more likely right than wrong" for a calibrated score (the shipped adapter's ECE is 0.04 on arith);
    # at 0.9 it almost never stopped early (1 reply in 300 scores that high).
    threshold: float = Field(0.5, ge=0, le=1, description="adaptive: stop once a sample's p_keep reaches this")
    k: int | None = Field(None, ge=1, description="prune: samples kept at each prune point (default budget // 4)")
    prune_threshold: float | None = Field(None, ge=0, le=1, description="prune: keep samples with p_keep >= this")
    prune_at: tuple[int, ...] = Field((32,), description="prune: generated-token counts at which to score and prune")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0 = greedy); adaptive 'constant'")
    schedule: Literal["constant", "linear", "exponential"] = Field("linear", description="adaptive: temperature per round")
    t_min: float = Field(0.1, ge=0, description="adaptive: first round's temperature")
    t_max: float = Field(1.0, ge=0, description="adaptive: last round's temperature")
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, lt=1)
    repeat_penalty: float = Field(1.0, gt=0)
    extractor: Literal["last-number", "regex", "exact"] = Field("last-number", description="votes: answer extractor")
    pattern: str | None = Field(None, description="votes: the regex of the 'regex' extractor (group 1 if any)")
    max_tokens: int = Field(256, ge=1)
    stop: tuple[str, ...] = ()
    seed: int = Field(0, ge=0, description="sample i uses seed + i")
    self_eval: SelfEvalConfig | None = Field(None, description="the scorer's suffix; the model's GGUF keys when omitted")
    # Step search (beam, lookahead): a step ends at the delimiter or after max_step_tokens.
    step_delimiter: str = Field("\n", min_length=1, description="beam/lookahead: the text that ends a reasoning step")
    max_step_tokens: int = Field(24, ge=1, description="beam/lookahead: the longest step, in tokens")
    beam_width: int = Field(4, ge=1, description="beam/lookahead: M; the top budget/M beams are kept, each expanded M ways")
    max_rounds: int = Field(40, ge=1, description="beam/lookahead: step rounds before the search stops")
    lookahead: int = Field(1, ge=1, description="lookahead: greedy steps rolled out before a step is scored")
    sequential_ratio: float = Field(
        0.5, ge=0, le=1,
        description="revise: attempts per chain = max(1, round(budget * ratio)); chains = budget // that",
    )
    revise_prompt: str = Field(DEFAULT_REVISE_PROMPT, min_length=1, description="revise: the user turn before a new attempt")
    policy: Path | None = Field(None, description="auto: compute-optimal policy JSON; the default model's shipped one when omitted")

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {v!r} (choose from {', '.join(STRATEGY_NAMES)})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StrategyConfig:
        if self.k is not None and self.k > self.budget:
            raise ValueError(f"k ({self.k}) must be <= budget ({self.budget})")
        if self.strategy in PRUNING:
            pts = self.prune_at
            if not pts:
                raise ValueError("prune_at needs at least one token count")
            if any(p < 1 for p in pts) or list(pts) != sorted(set(pts)):
                raise ValueError(f"prune_at {list(pts)} must be increasing positive token counts")
            if pts[-1] >= self.max_tokens:
                raise ValueError(f"prune point {pts[-1]} is not below max_tokens ({self.max_tokens})")
        if self.strategy in STEP_SEARCH and (self.budget < self.beam_width or self.budget % self.beam_width):
            raise ValueError(
                f"{self.strategy} keeps budget/M beams and expands each M ways: budget ({self.budget}) must be a "
                f"multiple of the beam width M ({self.beam_width})"
            )
        if self.strategy == "revise" and self.budget < 2:
            raise ValueError("revise needs a budget of at least 2 (one attempt and one revision)")
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must be <= t_max ({self.t_max})")
        if self.schedule == "exponential" and self.t_min <= 0:
            raise ValueError("the exponential schedule needs t_min > 0")
        if self.extractor == "regex":
            if not self.pattern:
                raise ValueError("the regex extractor needs a `pattern`")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regex ({exc})") from None
        elif self.pattern is not None:
            raise ValueError(f"`pattern` is only used by the regex extractor (extractor is {self.extractor!r})")
        return self

    @property
    def keep_k(self) -> int | None:
        """Samples kept at a prune point: k, else budget // 4 unless a prune_threshold alone decides."""
        if self.k is not None or self.prune_threshold is not None:
            return self.k
        return max(1, self.budget // 4)

    @property
    def chain_length(self) -> int:
        """revise: attempts per chain (the first attempt and its revisions)."""
        return max(1, min(self.budget, round(self.budget * self.sequential_ratio)))

    @property
    def chains(self) -> int:
        """revise: chains run side by side."""
        return self.budget // self.chain_length

    @classmethod
    def parse(cls, data: Mapping[str, Any], what: str = "strategy config") -> StrategyConfig:
        """Validate, turning pydantic's report into a one-line UsageError."""
        return validated(cls, data, what)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> StrategyConfig:
        """From a .toml or .json file (a [self_eval] table configures the scorer); `overrides` (flags that
        were given, None values skipped) win over the file."""
        data = load_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls.parse(data, str(path))
        se = cfg.self_eval
        if se is not None and se.adapter is not None and not se.adapter.is_absolute():
            cfg = cfg.model_copy(update={"self_eval": se.model_copy(update={"adapter": Path(path).parent / se.adapter})})
        return cfg

    def with_options(self, **overrides: Any) -> StrategyConfig:
        """A copy with some options changed (None values skipped), validated again."""
        data = self.model_dump(exclude_unset=True)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).parse(data)
