"""Events streamed from the engine and the strategies to their caller. Text is built from the stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "eos", "length", "cancelled", "pruned"]


class Cancelled(Exception):
    """A generation was cancelled from another thread; the engine stays usable."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("the generation was cancelled",)))


@dataclass(frozen=True)
class SampleStarted:
    """A sample begins. With `parent` it is a branch of that sample (beam search): it starts with the parent's text,
    which its own Token events do not repeat, and the parent, continued by its branches, gets no Finished."""

    sample: int
    temperature: float
    seed: int
    parent: int | None = None


@dataclass(frozen=True)
class Token:
    sample: int
    token: int
    text: str  # newly releasable text: may be empty while a character or stop string is incomplete
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the step's most likely tokens and log-probabilities, when asked for


@dataclass(frozen=True)
class Finished:
    sample: int
    reason: FinishReason
    text: str  # the whole sample: its Token events' texts, then `tail`
    n_tokens: int
    sum_logprob: float
    # Text released only now, which no Token carried: what was held back as the possible start of a stop string
    # or of a character when the sample was ended from outside its decode (cancelled, pruned, out of rounds).
    tail: str = ""


@dataclass(frozen=True)
class Usage:
    """The compute account of one request."""

    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0
    generated_tokens: int = 0
    selfeval_tokens: int = 0
    samples_started: int = 0
    samples_pruned: int = 0
    # llama_decode calls the engine made while the request ran: in a server they are shared with the requests
    # decoded alongside, and a stream paused meanwhile counts those of whatever ran on the engine in the pause
    decode_calls: int = 0
    wall_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    usage: Usage


Event = SampleStarted | Token | Finished | Done
