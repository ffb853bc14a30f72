"""OpenAI response bodies and stream chunks, folded from one job's events.

Plain jobs: choice i is sample i. A token's `token` string in logprobs is the text the engine released with it,
so the tokens of a choice join into its content exactly (a stop string is held back and never released, and the
tokens that end a reply without text of their own, the end-of-generation token or a stop string's, are left
out). Strategy jobs: the chosen sample is choice 0, then the other samples that were not pruned, best p_keep
first, at most n; their text is known only when the run ends, so a stream sends it then.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from edge_adapt.engine.events import Done, Finished, Token, Usage
from edge_adapt.result import Collector, Result
from edge_adapt.server.openai_errors import APIError
from edge_adapt.strategies.events import Pruned

FINISH = {"stop": "stop", "eos": "stop", "length": "length"}  # OpenAI's values; cancelled / pruned never reach a client


@dataclass(frozen=True)
class Shape:
    """What one response looks like: endpoint, ids and the options that change its fields."""

    kind: Literal["chat", "text"]
    model: str
    n: int
    top_logprobs: int | None = None  # None: no logprobs
    strategy: str | None = None
    include_usage: bool = False
    token_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)
    id: str = ""
    created: int = 0

    @classmethod
    def new(cls, kind: Literal["chat", "text"], model: str, n: int, **options: Any) -> Shape:
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        return cls(kind, model, n, id=prefix + uuid.uuid4().hex[:24], created=int(time.time()), **options)


@dataclass(frozen=True)
class Alternative:
    """One of the most likely tokens at a step: its name (its text; a byte that is part of a character as an
    escape, "\\xf0", so that no two tokens share a name), its log-probability and its bytes."""

    name: str
    logprob: float
    raw: bytes


@dataclass
class TokenLog:
    text: str
    logprob: float
    top: list[Alternative]
    token: int = -1


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str
    logs: list[TokenLog] = field(default_factory=list)
    scores: tuple[tuple[int, float], ...] | None = None  # strategy runs only
    p_keep: float | None = None
    sample: int | None = None


def _finite(x: float) -> float:
    """JSON has no -Infinity: a token the model rules out entirely gets OpenAI's floor instead."""
    return x if math.isfinite(x) else -9999.0


def usage_body(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.generated_tokens,
            "total_tokens": u.prompt_tokens + u.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": u.prompt_tokens_reused}}


def edge_adapt_body(strategy: str, result: Result) -> dict[str, Any]:
    u, chosen = result.usage, result.chosen
    difficulty = result.difficulty.bin if result.difficulty is not None else u.extra.get("difficulty_bin")
    body = {"strategy": strategy, "samples_started": u.samples_started, "samples_pruned": u.samples_pruned,
            "generated_tokens": u.generated_tokens, "selfeval_tokens": u.selfeval_tokens,
            "difficulty_bin": int(difficulty) if difficulty is not None else None}
    if chosen is not None and chosen.answer is not None:  # vote strategies: the answer that won and its votes
        body.update(answer=chosen.answer, votes=chosen.votes)
    return body


class Assembler:
    """Folds one job's events. `add(ev)` returns the stream chunks the event completes (stream or not: a
    non-streaming caller drops them) and `body()`, once Done arrived, is the non-streaming response."""

    def __init__(self, shape: Shape, piece: Callable[[int], bytes]) -> None:
        self.shape = shape
        self.piece = piece
        self.collector = Collector()
        self.logs: dict[int, list[TokenLog]] = {}
        self.texts: dict[int, str] = {}  # plain jobs: text streamed so far per choice
        self.sent: dict[int, int] = {}  # plain jobs: log entries already streamed per choice
        self.finished: dict[int, str] = {}  # plain jobs: OpenAI finish reason per choice
        self.pruned: set[int] = set()
        self.usage: Usage | None = None

    # -- events -----------------------------------------------------------------------------------------
    def opening(self) -> list[dict[str, Any]]:
        """A plain chat stream's first chunks: the role of every choice, in order."""
        if self.shape.kind != "chat" or self.shape.strategy is not None:
            return []
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.shape.n)]

    def add(self, ev: object) -> list[dict[str, Any]]:
        self.collector.add(ev)
        if isinstance(ev, Pruned):
            self.pruned.add(ev.sample)
        elif isinstance(ev, Token) and self.shape.strategy is None:
            return self._token(ev)
        elif isinstance(ev, Finished) and self.shape.strategy is None:
            return self._finished(ev)
        elif isinstance(ev, Done):
            self.usage = ev.usage
            return self._closing()
        return []

    def _token(self, ev: Token) -> list[dict[str, Any]]:
        logs = self.logs.setdefault(ev.sample, [])
        if self.shape.top_logprobs is not None:
            top = [self._alternative(t, lp) for t, lp in ev.top[: self.shape.top_logprobs]]
            logs.append(TokenLog(ev.text, _finite(ev.logprob), top, ev.token))
        if not ev.text:
            return []  # part of a character, or held back as a possible stop string: sent with later text
        offset = len(self.texts.get(ev.sample, ""))
        self.texts[ev.sample] = self.texts.get(ev.sample, "") + ev.text
        fresh = logs[self.sent.get(ev.sample, 0):]
        self.sent[ev.sample] = len(logs)
        return [self._content(ev.sample, ev.text, fresh, offset)]

    def _finished(self, ev: Finished) -> list[dict[str, Any]]:
        if ev.reason not in FINISH:
            raise APIError(503, f"the reply was {ev.reason} before it was complete (the server is stopping)")
        logs = self.logs.get(ev.sample, [])
        sent = self.sent.get(ev.sample, 0)
        rest: list[TokenLog] = []
        if self.shape.token_ids:  # every token the reply drew is named, the end-of-generation one too (as vLLM does)
            rest = logs[sent:]
            self.sent[ev.sample] = sent + len(rest)
        del logs[sent + len(rest):]  # tokens that released no text: end of generation, a stop string
        reason = self.finished[ev.sample] = FINISH[ev.reason]
        if self.shape.kind == "chat":
            return [self._chunk(ev.sample, {}, finish_reason=reason,
                                logprobs=self._chat_logprobs(rest) if rest else None)]
        offset = len(self.texts.get(ev.sample, ""))
        return [self._chunk(ev.sample, None, text="", finish_reason=reason,
                            logprobs=self._text_logprobs(rest, offset) if rest else None)]

    def _closing(self) -> list[dict[str, Any]]:
        """A strategy stream's whole content (known only now), then the usage chunk when asked for."""
        chunks: list[dict[str, Any]] = []
        if self.shape.strategy is not None:
            choices = self.choices()
            if self.shape.kind == "chat":  # every choice's role first, as in a plain stream
                chunks += [self._chunk(c.index, {"role": "assistant", "content": ""}) for c in choices]
            for c in choices:
                if self.shape.kind == "chat":
                    chunks.append(self._content(c.index, c.text, [], 0))
                    chunks.append(self._chunk(c.index, {}, finish_reason=c.finish_reason, extra=self._edge(c)))
                else:
                    chunks.append(self._content(c.index, c.text, [], 0))
                    chunks.append(self._chunk(c.index, None, text="", finish_reason=c.finish_reason,
                                              extra=self._edge(c)))
        if self.shape.include_usage and self.usage is not None:
            last = self._envelope([], usage_body(self.usage))
            if self.shape.strategy is not None:
                last["edge_adapt"] = edge_adapt_body(self.shape.strategy, self.collector.result())
            chunks.append(last)
        return chunks

    # -- choices ----------------------------------------------------------------------------------------
    def choices(self) -> list[Choice]:
        result = self.collector.result()
        if self.shape.strategy is None:
            return [Choice(s.index, s.text, self._reason(s.finish_reason), self.logs.get(s.index, []))
                    for s in result.samples]
        kept = [s for s in result.samples if s.index not in self.pruned and s.finish_reason in FINISH]
        chosen = result.chosen
        out: list[Choice] = []
        if chosen is not None:
            scores = next((s.scores for s in result.samples if s.index == chosen.sample), ())
            out.append(Choice(0, chosen.text, FINISH.get(chosen.finish, "stop"), scores=scores,
                              p_keep=chosen.p_keep, sample=chosen.sample))
        rest = sorted((s for s in kept if chosen is None or s.index != chosen.sample),
                      key=lambda s: -(s.scores[-1][1] if s.scores else -1.0))
        for s in rest[: max(0, self.shape.n - len(out))]:
            out.append(Choice(len(out), s.text, FINISH[s.finish_reason], scores=s.scores,
                              p_keep=s.scores[-1][1] if s.scores else None, sample=s.index))
        return out

    @staticmethod
    def _reason(reason: str) -> str:
        if reason not in FINISH:
            raise APIError(503, f"the reply was {reason} before it was complete (the server is stopping)")
        return FINISH[reason]

    def body(self) -> dict[str, Any]:
        """The non-streaming response."""
        result = self.collector.result()
        choices = []
        for c in self.choices():
            if self.shape.kind == "chat":
                item: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": c.text,
                                                                      "refusal": None},
                                        "logprobs": self._chat_logprobs(c.logs), "finish_reason": c.finish_reason}
            else:
                item = {"index": c.index, "text": c.text, "logprobs": self._text_logprobs(c.logs, 0),
                        "finish_reason": c.finish_reason}
            item.update(self._edge(c))
            choices.append(item)
        body = {"id": self.shape.id, "object": self._object(stream=False), "created": self.shape.created,
                "model": self.shape.model, "system_fingerprint": None, "choices": choices,
                "usage": usage_body(result.usage)}
        if self.shape.strategy is not None:
            body["edge_adapt"] = edge_adapt_body(self.shape.strategy, result)
        return body

    # -- pieces -----------------------------------------------------------------------------------------
    def _alternative(self, token: int, logprob: float) -> Alternative:
        raw = self.piece(token)
        name = f"token_id:{token}" if self.shape.token_ids else raw.decode("utf-8", "backslashreplace")
        return Alternative(name, _finite(logprob), raw)

    def _object(self, *, stream: bool) -> str:
        if self.shape.kind == "text":
            return "text_completion"
        return "chat.completion.chunk" if stream else "chat.completion"

    def _edge(self, c: Choice) -> dict[str, Any]:
        if self.shape.strategy is None:
            return {}
        return {"edge_adapt": {"p_keep": c.p_keep, "sample": c.sample,
                               "scores": [[n, p] for n, p in (c.scores or ())]}}

    def _chunk(self, index: int, delta: dict[str, Any] | None, *, text: str | None = None,
               finish_reason: str | None = None, logprobs: Any = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.shape.kind == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice.update(logprobs=logprobs, finish_reason=finish_reason, **(extra or {}))
        return self._envelope([choice])

    def _envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        """A stream chunk, every one with the same keys: as OpenAI's, with include_usage each carries `usage`,
        null on all but the last."""
        chunk: dict[str, Any] = {"id": self.shape.id, "object": self._object(stream=True),
                                 "created": self.shape.created, "model": self.shape.model,
                                 "system_fingerprint": None, "choices": choices}
        if self.shape.include_usage:
            chunk["usage"] = usage
        return chunk

    def _content(self, index: int, text: str, logs: list[TokenLog], offset: int) -> dict[str, Any]:
        if self.shape.kind == "chat":
            lp = self._chat_logprobs(logs) if self.shape.top_logprobs is not None else None
            return self._chunk(index, {"content": text}, logprobs=lp)
        lp = self._text_logprobs(logs, offset) if self.shape.top_logprobs is not None else None
        return self._chunk(index, None, text=text, logprobs=lp)

    def _chat_logprobs(self, logs: list[TokenLog]) -> dict[str, Any] | None:
        if self.shape.top_logprobs is None:
            return None
        return {"content": [{"token": self._name(t), "logprob": t.logprob, "bytes": list(t.text.encode()),
                             "top_logprobs": [{"token": a.name, "logprob": a.logprob, "bytes": list(a.raw)}
                                              for a in t.top]} for t in logs],
                "refusal": None}

    def _name(self, t: TokenLog) -> str:
        """A drawn token as logprobs name it: its released text, or its id (return_tokens_as_token_ids)."""
        return f"token_id:{t.token}" if self.shape.token_ids else t.text

    def _text_logprobs(self, logs: list[TokenLog], offset: int) -> dict[str, Any] | None:
        """Completions' shape: parallel lists; text_offset counts characters from the start of the choice."""
        if self.shape.top_logprobs is None:
            return None
        offsets = []
        for t in logs:
            offsets.append(offset)
            offset += len(t.text)
        return {"tokens": [self._name(t) for t in logs], "token_logprobs": [t.logprob for t in logs],
                "top_logprobs": [{a.name: a.logprob for a in t.top} for t in logs], "text_offset": offsets}
