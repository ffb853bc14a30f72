"""Folding an event stream into a Result: the one place that knows how a run's events add up.

`Engine.generate` and `run_strategy` both stream events and end with Done(usage); `collect(events)` turns such a
stream into the samples (text, finish reason, tokens, every self-evaluation score), the chosen answer and the
compute account. A caller that also shows tokens as they come feeds a `Collector` event by event instead.
`Result.to_dict()` is the JSON schema of `edge-adapt run --json`, the same for plain and strategy runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from edge_adapt.engine.events import Done, Finished, Usage
from edge_adapt.errors import EdgeAdaptError
from edge_adapt.strategies.events import Chosen, DifficultyEstimated, Scored


@dataclass(frozen=True)
class SampleResult:
    index: int
    text: str
    finish_reason: str  # stop, eos, length, cancelled or pruned
    tokens: int
    mean_logprob: float
    scores: tuple[tuple[int, float], ...] = ()  # (tokens generated when scored, p_keep), in order


@dataclass(frozen=True)
class Result:
    samples: tuple[SampleResult, ...]  # every sample that finished, pruned ones included, by index
    usage: Usage
    chosen: Chosen | None = None  # a strategy's answer (plain generation has none)
    difficulty: DifficultyEstimated | None = None  # auto: the probe's bin

    @property
    def text(self) -> str:
        """The answer: the chosen sample's text, else the first sample's."""
        if self.chosen is not None:
            return self.chosen.text
        return self.samples[0].text if self.samples else ""

    def to_dict(self) -> dict[str, Any]:
        c, d = self.chosen, self.difficulty
        return {
            "chosen": None if c is None else {"sample": c.sample, "text": c.text, "p_keep": c.p_keep,
                                              "answer": c.answer, "votes": c.votes},
            "samples": [{"index": s.index, "text": s.text, "finish_reason": s.finish_reason, "tokens": s.tokens,
                         "mean_logprob": s.mean_logprob, "scores": [list(x) for x in s.scores]} for s in self.samples],
            "usage": asdict(self.usage),
            "difficulty": None if d is None else {"bin": d.bin, "p_keep": d.p_keep, "choice": d.choice,
                                                  "row_budget": d.row_budget},
        }


class Collector:
    """Folds events one at a time; `result()` once the stream has ended."""

    def __init__(self) -> None:
        self._finished: dict[int, Finished] = {}
        self._scores: dict[int, list[tuple[int, float]]] = {}
        self._chosen: Chosen | None = None
        self._difficulty: DifficultyEstimated | None = None
        self._usage: Usage | None = None

    def add(self, ev: object) -> None:
        if isinstance(ev, Finished):
            self._finished[ev.sample] = ev
        elif isinstance(ev, Scored):
            self._scores.setdefault(ev.sample, []).append((ev.n_tokens, ev.p_keep))
        elif isinstance(ev, Chosen):
            self._chosen = ev
        elif isinstance(ev, DifficultyEstimated):
            self._difficulty = ev
        elif isinstance(ev, Done):
            self._usage = ev.usage

    def result(self) -> Result:
        if self._usage is None:
            raise EdgeAdaptError("the event stream ended without Done(usage): it was not read to the end")
        samples = tuple(
            SampleResult(f.sample, f.text, f.reason, f.n_tokens, f.sum_logprob / max(1, f.n_tokens),
                         tuple(self._scores.get(f.sample, ())))
            for f in (self._finished[i] for i in sorted(self._finished))
        )
        return Result(samples, self._usage, self._chosen, self._difficulty)


def collect(events: Iterable[object]) -> Result:
    c = Collector()
    for ev in events:
        c.add(ev)
    return c.result()
