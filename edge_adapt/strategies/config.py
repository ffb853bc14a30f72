"""StrategyConfig: every option of every strategy, checked once at the edge (CLI flags, TOML/JSON files)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_adapt.engine.sampling import check_sampling, stop_strings
from edge_adapt.errors import UsageError, not_a_bool, validated
from edge_adapt.selfeval.config import SelfEvalConfig, load_mapping
from edge_adapt.strategies import registry
from edge_adapt.strategies.policy import Policy

DEFAULT_REVISE_PROMPT = "Check your answer step by step. If it is wrong, give a corrected answer; if it is right, give it again."


class StrategyConfig(BaseModel):
    """How to spend inference-time compute on one prompt. Loadable from TOML/JSON (`from_file`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    strategy: str = Field("single", description="a registered strategy (edge_adapt.strategies.STRATEGIES)")
    budget: int = Field(
        8, ge=1, le=255, validation_alias=AliasChoices("budget", "n"),
        description="samples: N of best-of-n / prune / votes, the most an adaptive run may start",
    )
    # 0.5: "more likely right than wrong" for a calibrated score (the shipped adapter's ECE is 0.04 on arith);
    # at 0.9 it almost never stopped early (1 reply in 300 scores that high).
    threshold: float = Field(0.5, ge=0, le=1, description="adaptive: stop once a sample's p_keep reaches this")
    k: int | None = Field(None, ge=1, validation_alias=AliasChoices("keep", "k"),  # keep: the flag's and the API's name
                          description="prune: samples kept at each prune point (default budget // 4)")
    prune_threshold: float | None = Field(None, ge=0, le=1, description="prune: keep samples with p_keep >= this")
    prune_at: tuple[int, ...] = Field((32,), description="prune: generated-token counts at which to score and prune")
    # Sampling settings: their ranges are declared once, in edge_adapt.engine.sampling (checked below).
    temperature: float = Field(0.7, description="sampling temperature (0 = greedy); adaptive 'constant'")
    schedule: Literal["constant", "linear", "exponential"] = Field("linear", description="adaptive: temperature per round")
    t_min: float = Field(0.1, description="adaptive: first round's temperature")
    t_max: float = Field(1.0, description="adaptive: last round's temperature")
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    extractor: Literal["last-number", "regex", "exact"] = Field("last-number", description="votes: answer extractor")
    pattern: str | None = Field(None, description="votes: the regex of the 'regex' extractor (group 1 if any)")
    max_tokens: int = Field(256, ge=1)
    stop: tuple[str, ...] = ()
    seed: int = Field(0, description="sample i uses seed + i")
    self_eval: SelfEvalConfig | None = Field(None, description="the scorer's suffix; the model's GGUF keys when omitted")
    # Step search (beam, lookahead): a step ends at the delimiter or after max_step_tokens.
    step_delimiter: str = Field("\n", min_length=1, description="beam/lookahead: the text that ends a reasoning step")
    max_step_tokens: int = Field(24, ge=1, description="beam/lookahead: the longest step, in tokens")
    beam_width: int | None = Field(
        None, ge=1,
        description="beam/lookahead: M; the top budget/M beams are kept, each expanded M ways (default: 4, or the "
                    "budget when it is smaller)",
    )
    max_rounds: int = Field(40, ge=1, description="beam/lookahead: step rounds before the search stops")
    lookahead: int = Field(1, ge=1, description="lookahead: greedy steps rolled out before a step is scored")
    sequential_ratio: float = Field(
        0.5, ge=0, le=1,
        description="revise: the share of the budget one chain spends: about 1/ratio chains of budget * ratio "
                    "attempts each (at most budget - 1 chains, so that one revises)",
    )
    revise_prompt: str = Field(DEFAULT_REVISE_PROMPT, min_length=1, description="revise: the user turn before a new attempt")
    policy: Path | Policy | None = Field(
        None, description="auto: compute-optimal policy JSON (loaded once, in preflight); the default model's shipped one when omitted",
    )

    @model_validator(mode="before")
    @classmethod
    def _named_once(cls, data: Any) -> Any:
        """An option given by two of its names (budget and n, keep and k): pydantic would take one and call the
        other an unknown input, though both are its names."""
        if isinstance(data, Mapping):
            names: dict[str, list[str]] = {}
            for key in data:
                names.setdefault(FIELD_OF.get(key, key), []).append(key)
            if twice := next((keys for keys in names.values() if len(keys) > 1), None):
                raise ValueError(f"{' and '.join(twice)} name the same option, given twice: give one of them")
        return data

    @field_validator("budget", "k", "max_tokens", "seed", "top_k", "max_step_tokens", "beam_width", "max_rounds",
                     "lookahead", "prune_at", mode="before")
    @classmethod
    def _counts_are_not_bools(cls, v: Any) -> Any:
        return not_a_bool(v)

    @field_validator("threshold", "prune_threshold", "sequential_ratio", mode="before")
    @classmethod
    def _shares_are_numbers(cls, v: Any) -> Any:
        """NaN fails every comparison, so pydantic's range check called it "greater than 1": say what it is."""
        if isinstance(v, float) and math.isnan(v):
            raise ValueError("must be a number in [0, 1], got nan")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        """One string or several, as `generate` takes them; checked here, before anything is decoded: an empty
        stop string would end every reply at once."""
        if isinstance(v, str):
            v = (v,)
        if isinstance(v, (list, tuple)) and any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
            try:  # a lone surrogate could never match: refused as generate() refuses it
                stop_strings(v)
            except UsageError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in registry.STRATEGIES:
            raise ValueError(f"unknown strategy {v!r} (choose from {', '.join(registry.names())})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StrategyConfig:
        try:
            check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                           repeat_penalty=self.repeat_penalty, seed=self.seed)
            check_sampling(temperature=self.t_min)
            check_sampling(temperature=self.t_max)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        if self.k is not None and self.k > self.budget:
            raise ValueError(f"keep ({self.k}) must be <= budget ({self.budget})")
        if ("prune_at" not in self.model_fields_set and "prune_at" in registry.STRATEGIES[self.strategy].reads
                and self.prune_at[-1] >= self.max_tokens):  # the strategy's check would blame a point never given
            raise ValueError(f"the default prune point {self.prune_at[-1]} is not below max_tokens ({self.max_tokens}): "
                             "give prune_at (--prune-at) below it, or raise max_tokens (--max-tokens)")
        registry.STRATEGIES[self.strategy].check(self)
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

    def unread(self, fields: Iterable[str]) -> list[str]:
        """Of `fields` (options a caller set, by field name or alias such as `keep`), those this config's strategy
        does not read, named as given: a front end refuses them rather than ignore them in silence. Adaptive
        reads `temperature` only on the constant schedule (t_min and t_max otherwise)."""
        read = registry.STRATEGIES[self.strategy].reads
        if "schedule" in read:
            read -= {"t_min", "t_max"} if self.schedule == "constant" else {"temperature"}
        return [f for f in fields if FIELD_OF.get(f, f) in _SOME and FIELD_OF.get(f, f) not in read]

    def refuse_unread(self, fields: Iterable[str], where: str = "") -> None:
        """Raise a UsageError naming those of `fields` (options a caller set) that `unread` names; `where` says
        where they were set (" in FILE")."""
        if unread := self.unread(fields):
            raise UsageError(f"{', '.join(unread)}{where} {'is' if len(unread) == 1 else 'are'} not used by strategy "
                             f"{self.strategy}", field=FIELD_OF.get(unread[0], unread[0]))

    @property
    def width(self) -> int:
        """beam/lookahead: M, the expansions per kept beam."""
        return self.beam_width if self.beam_width is not None else min(4, self.budget)

    @property
    def keep_k(self) -> int | None:
        """Samples kept at a prune point: k, else budget // 4 unless a prune_threshold alone decides."""
        if self.k is not None or self.prune_threshold is not None:
            return self.k
        return max(1, self.budget // 4)

    @property
    def chain_lengths(self) -> tuple[int, ...]:
        """revise: attempts per chain (a first attempt and its revisions), longest first. About 1/ratio chains
        (rounded half up), so that each is about budget * ratio long; at most budget - 1, so that a chain revises
        at least once (budget 2 is one attempt and one revision at any ratio). The whole budget is spent: the
        lengths differ by at most one."""
        few = self.budget * self.sequential_ratio <= 1  # then 1/ratio >= budget (and no division by 0)
        wanted = self.budget if few else math.floor(1 / self.sequential_ratio + 0.5)
        chains = max(1, min(self.budget - 1, wanted))
        length, longer = divmod(self.budget, chains)
        return tuple(length + (i < longer) for i in range(chains))

    @classmethod
    def parse(cls, data: Mapping[str, Any], what: str = "strategy config") -> StrategyConfig:
        """Validate, turning pydantic's report into a one-line UsageError."""
        return validated(cls, data, what)

    @classmethod
    def from_caller(cls, config: StrategyConfig | Mapping[str, Any], what: str, *,
                    unread_ok: bool = False) -> StrategyConfig:
        """A library call's `what` argument: a StrategyConfig or a dict of its fields. An option the caller set
        (a key of the dict, a field set on the config) that the strategy does not read is refused, as front ends
        refuse it, unless `unread_ok`."""
        if isinstance(config, Mapping):
            cfg, given = cls.parse(config), config.keys()
        elif isinstance(config, cls):
            cfg, given = config, config.model_fields_set
        else:
            raise UsageError(f"{what} must be a StrategyConfig or a dict of its fields, got {type(config).__name__}")
        if not unread_ok:
            cfg.refuse_unread(given)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path, *, defaults: Mapping[str, Any] | None = None, unread_ok: bool = False,
                  **overrides: Any) -> StrategyConfig:
        """From a .toml or .json file (a [self_eval] table configures the scorer); `overrides` (flags that
        were given, None values skipped) win over the file, and the file over `defaults` (a front end's own,
        such as chat's longer replies). A setting of the file that the strategy does not read is refused as
        front ends refuse such flags (one for the file's strategy too, when an override names another), unless
        `unread_ok`: a chat keeps them for the strategies it may switch to. Relative paths in the file (policy,
        self_eval.adapter) are the file's neighbours."""
        given = {k: v for k, v in overrides.items() if v is not None}
        overridden = {FIELD_OF.get(k, k) for k in given}  # by any of its names: `n` in the file, `budget` given
        file = {k: v for k, v in load_mapping(path).items() if FIELD_OF.get(k, k) not in overridden}
        cfg = cls.parse({**(defaults or {}), **file, **given}, str(path))
        if not unread_ok:
            cfg.refuse_unread(file, f" in {path}")
        update: dict[str, Any] = {}
        if "policy" in file and isinstance(cfg.policy, Path) and not cfg.policy.is_absolute():
            update["policy"] = Path(path).parent / cfg.policy
        se = cfg.self_eval
        if "self_eval" in file and se is not None and se.adapter is not None and not se.adapter.is_absolute():
            update["self_eval"] = se.model_copy(update={"adapter": Path(path).parent / se.adapter})
        return cfg.model_copy(update=update)

    def with_options(self, **overrides: Any) -> StrategyConfig:
        """A copy with some options changed (None values skipped), validated again."""
        data = self.model_dump(exclude_unset=True)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).parse(data)


# The options only some strategies read (StrategySpec.reads); every strategy reads the others.
_SOME = frozenset(StrategyConfig.model_fields) - {"strategy", "max_tokens", "stop", "seed"}
# Each option's field by its other names (`keep`: k, `n`: budget), for settings that name it either way.
FIELD_OF: dict[str, str] = {alias: name for name, field in StrategyConfig.model_fields.items()
                            if isinstance(field.validation_alias, AliasChoices)
                            for alias in field.validation_alias.choices if isinstance(alias, str)}
