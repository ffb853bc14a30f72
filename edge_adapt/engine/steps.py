"""Step programs: generation, scoring and strategies written as generators that *yield* what they want decoded.

A step program yields `Decode` requests and events. Whoever drives it decodes each request, then resumes the
program, which reads the logits the decode left on its sequences. A generating program first yields a `Sampling`
request for its step's tokens, which the driver picks before resuming it. That one shape serves both ends:

- one program (the CLI, `Engine.generate`, `run_strategy`, eval): `drive` samples and decodes each request at
  once, so nothing changes for a single caller;
- many programs (`edge-adapt serve`): the scheduler runs every admitted request's program to its next request,
  samples the rows of all the `Sampling` requests at once (`sample_together`: at temperature 0.8 a row sampled
  with 15 others costs a quarter of what it costs alone), and decodes all the `Decode` requests together
  (`decode_together`), so the live sequences of every client advance in the same `llama_decode` calls.

Nothing but `decode_together` calls `llama_decode` for a step program: what a program does between its
yields (forks, releases, edits of its rows of logits) touches only its own sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from edge_adapt.engine.events import Cancelled
from edge_adapt.engine.sampling import SamplingParams, sample_rows
from edge_adapt.errors import EngineError

if TYPE_CHECKING:
    from edge_adapt.engine.engine import Sequence
    from edge_adapt.engine.handles import Adapter

R = TypeVar("R")


@dataclass(frozen=True)
class Decode:
    """A request to append `updates` ((sequence, tokens) pairs) and decode them, with `adapter` switched on
    (self-evaluation suffixes) or not (everything else). Afterwards each sequence's logits predict its next
    token."""

    updates: tuple[tuple[Sequence, tuple[int, ...]], ...]
    adapter: Adapter | None = None
    scale: float = 1.0
    # The program's own work that needs nothing from this decode (a step's text and log-probabilities): the
    # engine runs it between llama_decode and reading the logits, while a GPU computes (Engine.extend). It runs
    # once whatever the decode's outcome; a program checks that it ran (a driver may not run it).
    meanwhile: Callable[[], None] | None = field(default=None, compare=False)

    @staticmethod
    def of(updates: Seq[tuple[Sequence, Seq[int]]], adapter: Adapter | None = None, scale: float = 1.0,
           meanwhile: Callable[[], None] | None = None) -> Decode:
        return Decode(tuple((s, tuple(t)) for s, t in updates), adapter, scale, meanwhile)


@dataclass(eq=False)
class Sampling:
    """A request to pick one token per row of `logits` (sample_rows' arguments); the driver puts them in `tokens`
    before resuming the program. The rows stay valid until the program's next `Decode`."""

    logits: np.ndarray
    params: Seq[SamplingParams]
    rngs: Seq[np.random.Generator]
    recent: Seq[np.ndarray] | None = None
    tokens: np.ndarray | None = None


def sample_together(requests: Seq[Sampling]) -> None:
    """Fill every request's tokens, the sampled rows of all of them in one `sample_rows` call.

    Sampling works row by row (each row with its own parameters and generator), so a row gets the token it gets
    alone; but a call costs about 130 us of numpy calls whatever its rows (one row of the default vocabulary at
    temperature 0.8: 132 us alone, 16 rows 32 us a row), which many one-sample requests would pay each. Their rows
    are copied into one block for it (a pass over them, far less); greedy-only requests are argmaxes where they lie.
    """
    sampled = [r for r in requests if not all(p.greedy for p in r.params)]
    if len(sampled) < 2:
        sampled = []
    for r in requests:
        if not any(r is x for x in sampled):
            r.tokens = sample_rows(r.logits, r.params, r.rngs, r.recent)
    if not sampled:
        return
    recent = None
    if any(r.recent is not None for r in sampled):
        recent = [row for r in sampled for row in (r.recent if r.recent is not None else [_NONE] * len(r.params))]
    tokens = sample_rows(np.concatenate([r.logits for r in sampled]), [p for r in sampled for p in r.params],
                         [g for r in sampled for g in r.rngs], recent)
    at = 0
    for r in sampled:
        r.tokens, at = tokens[at : at + len(r.params)], at + len(r.params)


_NONE = np.empty(0, dtype=np.intp)  # no recent tokens: a row without a repetition penalty


# A step program: yields Decode and Sampling requests (and, for generation and strategies, events); may return a value.
Program = Generator[Any, None, R]


class Decoder(Protocol):
    """The part of an engine that runs decodes (tests' scripted engines implement it too)."""

    def extend(self, updates: Seq[tuple[Sequence, Seq[int]]], meanwhile: Seq[Callable[[], None]] = ()) -> None: ...

    def adapter(self, adapter: Adapter | None, scale: float = 1.0) -> Any: ...


def decode_together(engine: Decoder, requests: Seq[Decode]) -> list[BaseException | None]:
    """Decode several programs' requests in as few `llama_decode` calls as the adapter allows: every request
    without an adapter in one `extend` (its n_batch chunks), then each adapter's requests in one more. An
    adapter applies to a whole decode, so base-model and adapter tokens never share one.

    Returns, per request, None or the error its group raised (a failed `extend` leaves every sequence of the
    group as it was, so each program gets the error at its yield and may handle it), or the error its own
    `meanwhile` raised: that is the program's, not its neighbours'.
    """
    errors: list[BaseException | None] = [None] * len(requests)
    groups: dict[tuple[int, float], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((0, 1.0) if r.adapter is None else (id(r.adapter), r.scale), []).append(i)

    def owned(i: int, work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except Exception as e:  # noqa: BLE001 - thrown into the program that asked for the work
                errors[i] = e
        return run

    for members in groups.values():
        first = requests[members[0]]
        work = [owned(i, m) for i in members if (m := requests[i].meanwhile) is not None]
        try:
            with engine.adapter(first.adapter, first.scale):
                updates = [u for i in members for u in requests[i].updates]
                if work:
                    engine.extend(updates, meanwhile=work)
                else:
                    engine.extend(updates)
        except (Cancelled, EngineError) as e:
            for i in members:
                errors[i] = e
    return errors


def drive(engine: Decoder, program: Program[R]) -> Generator[Any, None, R]:
    """Run one step program: decode each request as it comes and pass every other item on. Returns what the
    program returns; closing this closes the program (its `finally` blocks give its sequences back)."""
    error: BaseException | None = None
    try:
        while True:
            try:
                item = program.throw(error) if error is not None else next(program)
            except StopIteration as stop:
                return stop.value
            error = None
            if isinstance(item, Decode):
                error = decode_together(engine, [item])[0]
            elif isinstance(item, Sampling):
                sample_together([item])
            else:
                yield item
    finally:
        program.close()


def watched(program: Program[R], see: Any = None, *, keep: Any = None, mark: Any = None) -> Program[R]:
    """`yield from program`, calling `see(item)` on each item that is not a decode request, leaving out those
    `keep(item)` refuses, and passing each Decode on as `mark(item)` where given: a driver's errors thrown in at a
    yield reach the program (a bare `for item in program: yield item` would take them itself)."""
    error: BaseException | None = None
    try:
        while True:
            try:
                item = program.throw(error) if error is not None else next(program)
            except StopIteration as stop:
                return stop.value
            error = None
            if not isinstance(item, (Decode, Sampling)):
                if keep is not None and not keep(item):
                    continue
                if see is not None:
                    see(item)
            elif mark is not None and isinstance(item, Decode):
                item = mark(item)
            try:
                yield item
            except GeneratorExit:
                raise
            except BaseException as e:  # thrown in by whoever drives us: it is the program's to handle
                error = e
    finally:
        program.close()


def run_to_end(steps: Iterator[Any] | Generator[Any, None, R]) -> R:
    """The return value of a driven program that yields nothing but decode requests (a scorer's)."""
    gen = iter(steps)
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        raise EngineError(f"a scoring program yielded {type(item).__name__}, not a decode request")
