"""TrainConfig: what `edge-adapt train` and library callers pass to `train()` (pydantic: users write it)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The suffix the shipped adapter is trained on. Three tokens for SmolLM2 ([<|im_end|>, Rest, art]): scoring 16
# samples costs one decode of 48 tokens, about 2.4% of generating 128 tokens each (the earlier 4-token
# "<|im_end|>Restart?" cost 3.1-3.4% and validated no better: AUROC 0.814 vs 0.816).
DEFAULT_SUFFIX = "<|im_end|>Restart"
DEFAULT_YES = " Yes"
DEFAULT_NO = " No"

Method = Literal["alora", "lora", "full"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    labels: list[Path] = Field(..., min_length=1, description="label datasets from `edge-adapt label` (training "
                                                             "split), merged; a prompt in several counts once")
    validation: list[Path] = Field(..., min_length=1, description="label datasets of held-out prompts, merged like "
                                                                 "`labels`, for validation each epoch")
    out: Path = Field(..., description="output directory: adapter.gguf (or model.gguf), checkpoint, metrics, plots")
    model: Path | None = Field(None, description="base GGUF; the embedded default model when omitted")
    method: Method = Field("alora", description="alora: adapter acts from the suffix on; lora; full: merged model")
    rank: int = Field(8, ge=1, le=256, description="LoRA rank (8: the shipped adapter is 5 MB in f16); above "
                                                "`init`'s rank, that adapter is grown to this one")
    alpha: float = Field(32.0, gt=0)
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lr: float | None = Field(None, gt=0, le=1, description="learning rate; 3e-4 for (a)LoRA, 2e-5 for full when omitted")
    target: Literal["relative", "correct", "blend"] = Field(
        "relative", description="relative: the label's target, the share of other samples not better (Manvi et al.); "
                                "correct: 1 for a right answer, 0 for a wrong one; blend: (1 - w) * correct + "
                                "w * relative with w = relative_weight")
    relative_weight: float = Field(0.3, ge=0, le=1, description="w of the blend target: a wrong reply's target is "
                                                               "w * (1 - pass rate of the others), a right one's 1")
    rank_weight: float = Field(0.0, ge=0, le=100, description="weight of a listwise loss within each prompt (softmax over "
                                                      "its replies' scores against its right ones, per cut): what "
                                                      "best-of-N and pruning choose by; 0: none")
    init: Path | None = Field(None, description="continue from this (a)LoRA adapter (a previous run's "
                                                "`checkpoint/` directory, or an adapter GGUF such as the shipped "
                                                "one) instead of a fresh adapter")
    epochs: int = Field(2, ge=1)
    prompts_per_step: int = Field(4, ge=1, description="prompts (with all their samples and cuts) per optimizer step")
    lm_loss: float = Field(0.0, ge=0, le=100, description="weight of an LM loss on the responses (method full: keeps the "
                                                  "model's own distribution); ignored by (a)LoRA, which never "
                                                  "touches generation")
    suffix: str = Field(DEFAULT_SUFFIX, min_length=1, description="raw self-eval suffix trained on and exported")
    yes: str = DEFAULT_YES
    no: str = DEFAULT_NO
    validate_before: bool = Field(True, description="also validate the untrained model (the baseline in metrics)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (smoke tests)")
    export_type: str = Field("q8_0", description="GGUF type of the merged model (method full)")
    seed: int = Field(0, ge=0, lt=2**63, description="seeds torch and the order of the prompts")
    threads: int | None = Field(None, ge=1)
    force: bool = False

    @field_validator("labels", "validation", mode="before")
    @classmethod
    def _one_or_more(cls, v: object) -> object:
        return [v] if isinstance(v, (str, Path)) else v

    @model_validator(mode="after")
    def _all_read(self) -> TrainConfig:
        """A setting the chosen method or target never reads would change nothing, in silence: refused when it is
        not its default, named as the flag."""
        adapter = "is not used by --method full, which trains every weight and no adapter"
        unread = {
            "lm_loss": self.method != "full" and "is read only by --method full ((a)LoRA never touches generation)",
            "export_type": self.method != "full" and "is read only by --method full (an adapter is exported as f16)",
            "relative_weight": self.target != "blend" and f"is read only by --target blend, not {self.target}",
            "rank": self.method == "full" and adapter,
            "alpha": self.method == "full" and adapter,
            "targets": self.method == "full" and adapter,
        }
        for name, why in unread.items():
            if why and getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True):
                raise ValueError(f"--{name.replace('_', '-')} {why}")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.method == "full" else 3e-4)
