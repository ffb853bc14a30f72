"""What every strategy shares: the engine and scorer protocols, the pool of started samples, choosing."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence as Seq
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol

from edge_adapt.engine.engine import Sample, Sequence
from edge_adapt.engine.events import Event, SampleStarted
from edge_adapt.engine.sampling import SamplingParams
from edge_adapt.engine.steps import Program
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import Chosen, Pruned, Scored, StrategyEvent


class EngineLike(Protocol):
    """The part of `Engine` strategies use; tests pass a scripted fake."""

    decode_calls: int
    n_ctx_seq: int

    @property
    def free_sequences(self) -> int: ...

    def open(self, tokens: Seq[int]) -> Sequence: ...

    def opened(self, tokens: Seq[int]) -> AbstractContextManager[Sequence]: ...

    def start(
        self, root: Sequence, params: Seq[SamplingParams], *, max_tokens: int, stop: Seq[str] = (), first_index: int = 0,
        consume_root: bool = False,
    ) -> list[Sample]: ...

    def branch(self, parent: Sample, params: Seq[SamplingParams], *, first_index: int = 0) -> list[Sample]: ...

    def steps(
        self, samples: Seq[Sample], until: int | None = None, *, max_new: int | None = None, pause_on: str | None = None
    ) -> Program[None]: ...

    def extend(self, updates: Seq[tuple[Sequence, Seq[int]]]) -> None: ...

    def adapter(self, adapter: Any, scale: float = 1.0) -> AbstractContextManager[None]: ...

    def truncate(self, seq: Sequence, n: int) -> None: ...

    def release(self, seq: Sequence) -> None: ...


class Scorer(Protocol):
    """`SelfEvaluator` or a fake: p_keep per sample, as a step program that yields its decodes, and a running
    count of the tokens it decoded."""

    decoded_tokens: int

    def steps(self, samples: Seq[Sample]) -> Program[list[float]]: ...


StrategyFn = Callable[[EngineLike, Sequence, StrategyConfig, "Scorer | None"], Iterator["Event | StrategyEvent"]]


def sampling_params(config: StrategyConfig, temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
        repeat_penalty=config.repeat_penalty, seed=seed,
    )


class Pool:
    """The samples one strategy run started. Sample i uses seed + i; every sequence is given back exactly
    once (a released id may already belong to another sample, so a second release would be wrong)."""

    def __init__(self, engine: EngineLike, root: Sequence, config: StrategyConfig) -> None:
        self.engine, self.root, self.config = engine, root, config
        self.samples: list[Sample] = []
        self.scores: dict[int, float] = {}  # sample index -> latest p_keep
        self._scored_finished: set[int] = set()  # samples whose latest score was taken after they finished
        self._live_ids: set[int] = set()

    def _params(self, n: int, temperature: float) -> list[SamplingParams]:
        first = len(self.samples)
        return [sampling_params(self.config, temperature, self.config.seed + first + i) for i in range(n)]

    def _adopt(self, new: list[Sample], *, announce: bool = True, parent: Sample | None = None) -> Iterator[Event]:
        self.samples.extend(new)
        self._live_ids.update(s.index for s in new)
        if announce:
            for s in new:
                yield SampleStarted(s.index, s.params.temperature, s.params.seed,
                                    None if parent is None else parent.index)

    def start(self, n: int, temperature: float) -> Iterator[Event]:
        """Fork n samples from the prompt; they are appended to `self.samples`."""
        new = self.engine.start(self.root, self._params(n, temperature), max_tokens=self.config.max_tokens,
                                stop=self.config.stop, first_index=len(self.samples))
        yield from self._adopt(new)

    def branch(self, parent: Sample, n: int, temperature: float, *, announce: bool = True) -> Iterator[Event]:
        """Continue a paused sample n ways (its KV forked, its history copied); the children are appended to
        `self.samples`. `announce=False` for throw-away continuations (look-ahead roll-outs)."""
        new = self.engine.branch(parent, self._params(n, temperature), first_index=len(self.samples))
        yield from self._adopt(new, announce=announce, parent=parent)

    def follow(self, previous: Sample, temperature: float) -> Iterator[Event]:
        """A new sample that takes over `previous`'s sequence (whatever was decoded into it since stays its
        prompt); `previous` keeps its text and score but no longer owns a sequence."""
        new = self.engine.start(previous.seq, self._params(1, temperature), max_tokens=self.config.max_tokens,
                                stop=self.config.stop, first_index=len(self.samples), consume_root=True)
        self._live_ids.discard(previous.index)
        yield from self._adopt(new)

    def stop(self, samples: Seq[Sample]) -> Iterator[Event]:
        """End samples that are still generating where they are (finish reason 'length': a search ran out of
        rounds); they stay candidates."""
        for s in samples:
            if s.finish is None:
                yield s.end("length")

    def score(self, scorer: Scorer, samples: Seq[Sample]) -> Program[None]:
        """Score samples in one batch and record the scores. A sample scored after it finished is not scored
        again (its response cannot change); one scored mid-generation is, once it has finished."""
        todo = [s for s in samples if s.index not in self._scored_finished]
        for s, p in zip(todo, (yield from scorer.steps(todo))):
            self.scores[s.index] = p
            if s.finish is not None:
                self._scored_finished.add(s.index)
            yield Scored(s.index, p, len(s.generated), s.finish is not None)

    def release(self, samples: Seq[Sample]) -> None:
        for s in samples:
            if s.index in self._live_ids:
                self._live_ids.discard(s.index)
                self.engine.release(s.seq)

    def prune(self, samples: Seq[Sample]) -> Iterator[Event | StrategyEvent]:
        """Drop samples from the pool: Pruned, then Finished('pruned') for those still generating."""
        for s in samples:
            yield Pruned(s.index, self.scores.get(s.index, math.nan), len(s.generated))
            if s.finish is None:
                yield s.end("pruned")
        self.release(samples)

    def close(self) -> None:
        self.release(self.samples)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rank_key(self, s: Sample) -> tuple[float, float, int]:
        """Higher is better: p_keep, then mean log-probability, then the earlier sample."""
        p = self.scores.get(s.index)
        return (-math.inf if p is None or math.isnan(p) else p, s.mean_logprob, -s.index)

    def best(self, samples: Seq[Sample]) -> Sample:
        return max(samples, key=self.rank_key)

    def chosen(self, s: Sample, **extra: object) -> Chosen:
        return Chosen(
            s.index, s.text, self.scores.get(s.index), s.mean_logprob, len(s.generated), s.finish or "length",
            **extra,  # type: ignore[arg-type]
        )


def require_scorer(scorer: Scorer | None, name: str) -> Scorer:
    if scorer is None:
        from edge_adapt.errors import UsageError

        raise UsageError(f"strategy {name!r} needs a self-evaluation scorer")
    return scorer
