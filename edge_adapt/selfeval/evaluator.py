"""Scoring samples by self-evaluation on throw-away extensions of their KV cache."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.engine.engine import Engine, Sample, Sequence
from edge_adapt.engine.steps import Decode, Program, drive, run_to_end
from edge_adapt.errors import EngineError, UsageError
from edge_adapt.selfeval.config import SelfEvalConfig
from edge_adapt.selfeval.suffix import answer_token, render_suffix, split_for_adapter


def p_keep(logits: np.ndarray, yes: int, no: int) -> np.ndarray:
    """P(no) / (P(yes) + P(no)) per row: the softmax normaliser cancels, leaving sigmoid(logit_no - logit_yes)
    (computed as a tanh, which does not overflow)."""
    rows = np.atleast_2d(np.asarray(logits))
    diff = rows[:, no].astype(np.float64) - rows[:, yes].astype(np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * diff))


# The prompt fields and the format that reads each: chat asks `question`, raw appends `suffix` verbatim.
_READ_WITH = {"question": "chat", "suffix": "raw"}


def resolve_config(engine: Engine, config: SelfEvalConfig | None, adapter_path: str | Path | None) -> SelfEvalConfig:
    """The model's `edge_adapt.self_eval.*` keys, overridden by the adapter's, overridden by the fields
    the explicit config sets (so `SelfEvalConfig(adapter=p)` still takes the question p was trained on).
    A field the config sets that the resulting format does not read (a question when an adapter's metadata
    fixes a raw suffix) is refused: it would be dropped in silence.

    The embedded default model, given no adapter and no self-eval metadata of its own, gets the adapter
    trained for it (shipped in the package): untrained, its self-eval ranks answers no better than chance.
    """
    path = adapter_path if adapter_path is not None else (config.adapter if config is not None else None)
    shipped = False
    meta: dict[str, Any] = dict(engine.info.edge_adapt)
    if path is None and (config is None or config.default_adapter) and not any(k.startswith("self_eval.") for k in meta):
        from edge_adapt.engine.default_model import default_selfeval_adapter, is_default_model

        if is_default_model(engine.model_path):
            path = default_selfeval_adapter()
            shipped = path is not None
    # What set the format, and how to undo it, for a refusal below.
    format_by, hint = ("the model's GGUF metadata" if "self_eval.format" in meta else "the default config"), ""
    if path is not None:
        from edge_adapt.engine.gguf_file import check_adapter_fits, inspect_gguf

        adapter = inspect_gguf(path, expect="adapter")
        check_adapter_fits(engine.info, adapter)
        meta.update(adapter.edge_adapt)
        if "self_eval.format" in adapter.edge_adapt and shipped:
            format_by = f"the default model's shipped adapter {Path(path).name}"
            hint = "; default_adapter = false scores without it"
        elif "self_eval.format" in adapter.edge_adapt:
            format_by = f"the adapter {path}"
    data = SelfEvalConfig.from_gguf_metadata(meta).model_dump(exclude_unset=True)
    if config is not None:
        data.update(config.model_dump(exclude_unset=True))
    if path is not None:
        data["adapter"] = Path(path)
    resolved = SelfEvalConfig.parse(data)
    given = config.model_fields_set if config is not None else set()
    if "format" in given:
        format_by, hint = "the self-eval config", ""
    for field, reader in _READ_WITH.items():
        if field in given and resolved.format != reader:
            fixed = f" (suffix {resolved.suffix!r})" if resolved.format == "raw" else ""
            raise UsageError(f"self-eval {field} is read only with format {reader!r}; {format_by} sets format "
                             f"{resolved.format!r}{fixed}{hint}")
    return resolved


def suffix_tokens(model: Any, config: SelfEvalConfig | None = None) -> list[int]:
    """The suffix a SelfEvaluator would decode after each sample: `model` is an Engine, or a Vocab when the
    engine is still to be sized for it."""
    return render_suffix(resolve_config(model, config, None), model)


class SelfEvaluator:
    """p_keep for samples, complete or partial: one batched decode of the suffix over scratch extensions
    of their sequences, the adapter (if any) on only for that decode. The samples' own KV, tokens and
    logits are untouched, so generation continues from them exactly as if nothing had been scored.
    """

    def __init__(self, engine: Engine, config: SelfEvalConfig | None = None, adapter_path: str | Path | None = None):
        self.engine = engine
        self.config = resolve_config(engine, config, adapter_path)
        path = self.config.adapter
        self.adapter = engine.load_adapter(path) if path is not None else None
        self.suffix = render_suffix(self.config, engine)
        self.yes_token = answer_token(engine, self.config.yes, "yes")
        self.no_token = answer_token(engine, self.config.no, "no")
        invocation = self.adapter.invocation_tokens if self.adapter is not None else []
        self.base_part, self.adapter_part = split_for_adapter(self.suffix, invocation, f"the aLoRA {path}")
        self.decoded_tokens = 0  # suffix tokens decoded so far: the self-eval line of the compute account
        self.calls = 0

    def score(self, samples: Seq[Sample | Sequence]) -> list[float]:
        """p_keep per sample, in order."""
        return run_to_end(drive(self.engine, self.steps(samples)))

    def steps(self, samples: Seq[Sample | Sequence]) -> Program[list[float]]:
        """`score` as a step program (edge_adapt.engine.steps): the suffix's two decodes (base part, then the
        adapter's part with the adapter on) are yielded as requests, so a scheduler can batch them with other
        requests' decodes; returns p_keep per sample."""
        seqs = [s.seq if isinstance(s, Sample) else s for s in samples]
        if not seqs:
            return []
        if len({s.id for s in seqs}) != len(seqs):
            raise EngineError("cannot score the same sequence twice in one call")
        for s in seqs:
            if s.n_past != len(s.tokens):
                raise EngineError(f"sequence {s.id} has undecoded tokens; advance it before scoring")
        e = self.engine
        with e.scratch(seqs) as tmp:
            if self.base_part:
                yield Decode.of([(t, self.base_part) for t in tmp])
            yield Decode.of([(t, self.adapter_part) for t in tmp], self.adapter, self.config.adapter_scale)
            logits = np.stack([t.logits for t in tmp])  # type: ignore[misc]
        self.decoded_tokens += len(seqs) * len(self.suffix)
        self.calls += 1
        scores = p_keep(logits, self.yes_token, self.no_token)
        if not np.isfinite(scores).all():  # a choice by NaN would be a random one, reported as a score
            raise EngineError(f"the self-evaluation gave a score that is not a number (adapter "
                              f"{self.config.adapter or 'none'}, scale {self.config.adapter_scale:g}): its "
                              "logits overflowed")
        return scores.tolist()
