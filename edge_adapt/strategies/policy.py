"""The compute-optimal policy `auto` follows: (difficulty bin, budget) -> strategy and its settings.

Difficulty is read from one probe sample's p_keep (Snell et al. estimate it from verifier scores too): the
four bin edges are quantiles of probe scores on a tuning set, bin 1 holds the highest scores (easiest) and
bin 5 the lowest. `edge-adapt tune-policy` writes the file (edge_adapt/eval/tune.py); the default model ships
one in `models/`. It names the model and the self-evaluation it was tuned with, and `auto` refuses it with
another of either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_adapt.engine.sampling import SAMPLING_RULES
from edge_adapt.engine.vocab import same_model
from edge_adapt.errors import UsageError, validated
from edge_adapt.strategies.registry import STRATEGIES

POLICY_FORMAT = "edge-adapt-policy/1"
N_BINS = 5
PROBE = "probe"  # answer with the probe sample itself: no more compute for this bin
# What a bin may set: how its strategy spends and searches (StrategyConfig's names). Not what the caller owns
# (max_tokens, stop, seed, the scorer, how answers are extracted): a policy also arrives inline in HTTP requests,
# where a bin's regex `pattern` would run on the server's scheduler thread and could stall every client.
POLICY_OPTIONS = frozenset({
    "budget", "n", "k", "keep", "threshold", "prune_threshold", "prune_at", "temperature", "schedule", "t_min",
    "t_max", "top_k", "top_p", "min_p", "repeat_penalty", "max_step_tokens", "beam_width", "max_rounds",
    "lookahead", "sequential_ratio",
})


def _number(x: Any) -> bool:
    """A real number (a bool is not one); anything else is refused by StrategyConfig when the choice runs."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class PolicyChoice(BaseModel):
    """What to run in one bin: a strategy and how it spends compute (StrategyConfig options among POLICY_OPTIONS;
    those it leaves out take their defaults, not the caller's, and its budget defaults to the row's less the probe,
    which is also the most it may be)."""

    model_config = ConfigDict(extra="forbid")

    strategy: str
    options: dict[str, Any] = Field(default_factory=dict, description="StrategyConfig fields, e.g. budget, threshold")
    # Python's json reads and writes NaN and Infinity; a policy's numbers must be finite (the tuner's are).
    accuracy: float | None = Field(None, allow_inf_nan=False, description="on the tuning prompts of this bin (information only)")
    tokens: float | None = Field(None, allow_inf_nan=False, description="generated tokens per prompt there, probe included")
    prompts: int | None = None

    @model_validator(mode="after")
    def _known(self) -> PolicyChoice:
        if self.strategy != PROBE and (self.strategy not in STRATEGIES or self.strategy == "auto"):
            raise ValueError(f"unknown strategy {self.strategy!r} in the policy")
        if other := sorted(set(self.options) - POLICY_OPTIONS):
            raise ValueError(f"a policy's bin sets how its strategy spends compute, not {', '.join(other)} "
                             "(the caller's settings)")
        for name, value in self.options.items():  # ranges are StrategyConfig's; NaN would pass some of them
            values = value if isinstance(value, list) else [value]
            if any(isinstance(x, float) and not math.isfinite(x) for x in values):
                raise ValueError(f"option {name} must be finite, got {value!r:.40}")
        # Options the choice would ignore are refused, by the rule front ends refuse such flags with.
        if self.strategy == PROBE and self.options:
            raise ValueError(f"the probe runs nothing more: it does not read {', '.join(self.options)}")
        if self.strategy != PROBE:
            from edge_adapt.strategies.config import FIELD_OF, StrategyConfig  # config.py imports this module

            fields = [FIELD_OF.get(name, name) for name in self.options]
            if twice := [name for name, field in zip(self.options, fields) if fields.count(field) > 1]:
                raise ValueError(f"options {' and '.join(twice)} are one setting: give one")
            schedule = {"schedule": self.options["schedule"]} if "schedule" in self.options else {}
            if unread := StrategyConfig.model_construct(strategy=self.strategy, **schedule).unread(self.options):
                raise ValueError(f"{self.strategy} does not read {', '.join(unread)}")
        return self

    def describe(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.strategy} {opts}".strip()

    def budget(self, row_budget: int) -> Any:
        """The samples this choice starts after the probe in the row of `row_budget`: its own budget (`n` is
        StrategyConfig's other name for it), else the row's less the probe. As the file gives it: its type is
        StrategyConfig's to check."""
        return self.options.get("budget", self.options.get("n", row_budget - 1))


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["edge-adapt-policy/1"] = POLICY_FORMAT
    model: str = Field(description="fingerprint of the model it was tuned for (Engine.fingerprint)")
    self_eval: str = Field("", description="the self-evaluation it was tuned with (self_eval_name; a server's "
                                           "identity when tuned through --backend)")
    probe_temperature: float = 0.0
    bin_edges: list[float] = Field(description="4 increasing p_keep edges; p >= the last is bin 1 (easiest)")
    budgets: dict[int, list[PolicyChoice]] = Field(description="budget -> the choice for bins 1..5")
    tuning: dict[str, Any] = Field(default_factory=dict, description="how it was tuned (information)")

    @field_validator("bin_edges")
    @classmethod
    def _edges(cls, v: list[float]) -> list[float]:
        # NaN compares false both ways: NaN edges passed the order check and put every prompt in bin 5.
        if len(v) != N_BINS - 1 or not all(map(math.isfinite, v)) or any(b < a for a, b in zip(v, v[1:])):
            raise ValueError(f"must be {N_BINS - 1} non-decreasing finite numbers, got {v!r:.80}")
        return v

    @field_validator("probe_temperature")
    @classmethod
    def _probe_temperature(cls, v: float) -> float:
        ok, rule, _ = SAMPLING_RULES["temperature"]  # refused here, not at the first prompt's probe
        if not ok(v):
            raise ValueError(f"must be {rule}, got {v}")
        return v

    @field_validator("budgets")
    @classmethod
    def _tables(cls, v: dict[int, list[PolicyChoice]]) -> dict[int, list[PolicyChoice]]:
        if not v:
            raise ValueError("the policy has no budgets")
        for budget, row in v.items():
            if budget < 1 or len(row) != N_BINS:
                raise ValueError(f"budget {budget} needs a positive budget and {N_BINS} choices, one per bin")
            for bin, choice in enumerate(row, 1):
                # The probe is one of the row's samples: a choice spending more than the rest overspends every
                # caller the row serves (a hand-made budget of 200 started 201 samples for --budget 4).
                spend = choice.budget(budget)
                if choice.strategy != PROBE and _number(spend) and spend > budget - 1:
                    raise ValueError(f"the choice in bin {bin} at budget {budget} ({choice.describe()}) starts "
                                     f"{spend} samples after the probe; the row's budget leaves {budget - 1}")
        return dict(sorted(v.items()))

    def bin_of(self, p_keep: float) -> int:
        """1 (the probe scored at least the highest edge) .. 5 (below the lowest)."""
        return N_BINS - sum(p_keep >= e for e in self.bin_edges)

    def row_for(self, budget: int) -> tuple[int, list[PolicyChoice]]:
        """The choices tuned for the largest budget that fits `budget`."""
        fits = [b for b in self.budgets if b <= budget]
        if not fits:
            raise UsageError(f"budget {budget} is too small for this policy (smallest tuned budget: {min(self.budgets)})")
        return fits[-1], self.budgets[fits[-1]]

    def check_model(self, fingerprint: str) -> None:
        if not same_model(self.model, fingerprint):
            raise UsageError(f"the policy was tuned for model {self.model}, not this one ({fingerprint})")

    def check_self_eval(self, scorer: object) -> None:
        """The bin edges are quantiles of the tuning scorer's p_keep: another scorer's p_keep puts prompts in bins
        that mean nothing (the suffix without the shipped adapter scored a prompt 0.57 where the adapter gave 0.13,
        so it was answered with the probe alone). A record that names no config (a server's identity, an older
        policy's empty one) or a scorer without one has nothing to compare, and passes."""
        theirs, ours = _scoring(self.self_eval), _scoring(self_eval_name(scorer))
        if theirs is None or ours is None or theirs == ours:
            return

        def differing(d: dict[str, Any]) -> str:
            return " ".join(f"{k}={d[k]!r}" for k in sorted(d) if theirs.get(k, ...) != ours.get(k, ...))

        raise UsageError(f"the policy was tuned with self-evaluation {differing(theirs)}, and this run scores with "
                         f"{differing(ours)}: its difficulty bins are p_keep quantiles of its own self-evaluation; "
                         "score with that one (its adapter), or tune a policy for this one (edge-adapt tune-policy)")

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        from edge_adapt.fileio import read_user_file

        path = Path(path)
        try:
            raw = read_user_file(path, max_bytes=16 << 20)
        except UsageError as exc:
            raise UsageError(f"cannot read policy {exc}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"policy {path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UsageError(f"policy {path} is not a JSON object")
        if data.get("format") != POLICY_FORMAT:
            raise UsageError(f"{path} is not an edge-adapt policy (format {data.get('format')!r}, expected {POLICY_FORMAT!r})")
        return validated(cls, data, f"policy {path}")

    def dumps(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"


def self_eval_name(scorer: object) -> str | None:
    """How a policy names the self-evaluation it is tuned with: the scorer's class and config, the adapter by file
    name (a policy is shipped; the path it was tuned from is local). None for a scorer without a config."""
    config = getattr(scorer, "config", None)
    if not isinstance(config, BaseModel):
        return None
    adapter = getattr(config, "adapter", None)
    if adapter is not None:
        config = config.model_copy(update={"adapter": Path(Path(adapter).name)})
    return f"{type(scorer).__module__}.{type(scorer).__qualname__}:{config.model_dump_json()}"


def _scoring(name: str | None) -> dict[str, Any] | None:
    """What decides a self_eval_name's scores: the config fields its format reads, a field the record lacks
    (an older policy's, one added since) taken as its default; not how the adapter was found, nor the scorer's
    class (the server scores with a subclass that only counts its decodes). None where it names no config."""
    from edge_adapt.selfeval.config import SelfEvalConfig

    _, _, config = (name or "").partition(":")
    try:
        fields = json.loads(config)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    defaults = {k: f.default for k, f in SelfEvalConfig.model_fields.items()}
    prompt = "suffix" if fields.get("format", defaults["format"]) == "raw" else "question"
    return {k: fields.get(k, defaults[k] if k != "adapter" else None)
            for k in ("format", prompt, "yes", "no", "adapter", "adapter_scale")}
