"""The self-evaluation suffix and answers, as a user-written config (pydantic: it comes from files,
flags and GGUF metadata)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_adapt.errors import UsageError, validated

DEFAULT_QUESTION = 'Would you do better if you started over? ("Yes." or "No.")'

# GGUF metadata keys read by from_gguf_metadata, without the `edge_adapt.self_eval.` prefix.
GGUF_KEYS = ("format", "question", "suffix", "yes", "no", "adapter_scale")




class SelfEvalConfig(BaseModel):
    """What is appended after a response to ask the model whether it would do better starting over.

    format "chat": the assistant turn is closed, `question` is asked as a new user turn and the assistant
    turn is opened again, all rendered with the model's chat template (see `render_suffix`).
    format "raw": `suffix` is appended verbatim (special tokens such as <|im_end|> are parsed).
    The score is p_keep = P(no) / (P(yes) + P(no)) at the next token after the suffix.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["chat", "raw"] = "chat"
    question: str = Field(DEFAULT_QUESTION, min_length=1, description="the user turn (chat format)")
    suffix: str | None = Field(None, description="text appended after the response (raw format)")
    yes: str = Field("Yes", min_length=1, description="the answer meaning 'restarting would do better'; one token")
    no: str = Field("No", min_length=1, description="the answer meaning 'keep this response'; one token")
    adapter: Path | None = Field(None, description="LoRA / aLoRA GGUF switched on only while scoring")
    adapter_scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    default_adapter: bool = Field(True, description="with the embedded default model and no adapter given, score "
                                                    "with the self-eval adapter shipped for it")

    @model_validator(mode="after")
    def _check(self) -> SelfEvalConfig:
        if self.format == "raw" and not self.suffix:
            raise ValueError("format 'raw' needs a non-empty `suffix`")
        if self.yes == self.no:
            raise ValueError(f"`yes` and `no` must differ (both are {self.yes!r})")
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any], what: str = "self-eval config") -> SelfEvalConfig:
        """Validate, turning pydantic's report into a one-line UsageError."""
        return validated(cls, data, what)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> SelfEvalConfig:
        """From a GGUF's `edge_adapt.*` keys (prefix stripped, as in `Engine.info.edge_adapt`).

        Reads `self_eval.{format,question,suffix,yes,no,adapter_scale}`; other keys are ignored, so files
        from a newer converter still load. With no such keys this is the default config.
        """
        data = {k: meta[f"self_eval.{k}"] for k in GGUF_KEYS if f"self_eval.{k}" in meta}
        return cls.parse(data, "GGUF metadata edge_adapt.self_eval")

    @classmethod
    def from_file(cls, path: str | Path) -> SelfEvalConfig:
        """From a .toml or .json file: the keys at the top level or under a `self_eval` table."""
        data = load_mapping(path)
        if "self_eval" in data:
            data = data["self_eval"]
        cfg = cls.parse(data, str(path))
        if cfg.adapter is not None and not cfg.adapter.is_absolute():
            cfg = cfg.model_copy(update={"adapter": Path(path).parent / cfg.adapter})
        return cfg


def load_mapping(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON file as a dict, or a one-line UsageError."""
    from edge_adapt.fileio import read_user_file

    p = Path(path)
    raw = read_user_file(p, max_bytes=16 << 20)
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'} ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected a table of settings at the top level")
    return data
