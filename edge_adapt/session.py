"""A conversation that keeps its KV cache across turns: each turn decodes only what is new."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_adapt.engine.chat import Message
from edge_adapt.engine.engine import Engine, Sequence, Snapshot
from edge_adapt.engine.events import Done, Event, Finished, SampleStarted, Usage
from edge_adapt.engine.sampling import SamplingParams
from edge_adapt.engine.snapshot_file import check_against, load_snapshot, save_snapshot, taken
from edge_adapt.engine.budget import fit, parse_size
from edge_adapt.errors import BudgetError, ContextOverflowError, EdgeAdaptError, UsageError, check_count, is_whole
from edge_adapt.sizing import strategy_sequences
from edge_adapt.strategies import Chosen, StrategyConfig, plan_run, run_strategy


CHAT_HELP = """commands:
  /reset        forget the conversation
  /save FILE    save the conversation and its KV cache (add --force to overwrite)
  /load FILE    restore a saved conversation
  /strategy NAME [BUDGET]  answer with a strategy (single, best-of-n, adaptive, prune, vote, ...)
  /help         this text
  /exit         leave (Ctrl-D too); Ctrl-C interrupts a reply"""


@dataclass(frozen=True)
class Notice:
    """Something the user should know about a turn (e.g. old turns dropped to fit the context)."""

    text: str


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int  # tokens of the whole rendered conversation
    decoded_tokens: int  # of which had to be decoded this turn (the rest came from the KV cache)


class ChatSession:
    """Multi-turn chat over one engine sequence.

    Each turn renders the whole conversation with the model's template, keeps the longest prefix already in
    the KV cache, and decodes only the rest. When the conversation outgrows the context, the oldest turns
    are dropped (a system message is kept) and a Notice says how many.
    """

    def __init__(self, engine: Engine, *, system: str | None = None, params: SamplingParams = SamplingParams(),
                 max_tokens: int = 512, strategy: StrategyConfig | Mapping[str, Any] | None = None,
                 mem_budget: int | str | None = None, unread_ok: bool = False) -> None:
        if not isinstance(engine, Engine):
            raise UsageError(f"ChatSession takes an Engine, got {type(engine).__name__}")
        check_count("max_tokens", max_tokens)
        if not isinstance(params, SamplingParams):
            raise UsageError(f"params must be a SamplingParams, got {type(params).__name__}")
        if system is not None and not isinstance(system, str):
            raise UsageError(f"system must be a str, got {type(system).__name__}")
        if isinstance(mem_budget, str):
            mem_budget = parse_size(mem_budget)
        self.engine = engine
        self.params = params
        self.max_tokens = max_tokens
        self.mem_budget = mem_budget  # bytes the engine may grow to when a strategy needs more sequences
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.seq: Sequence | None = None
        self.last: TurnStats | None = None
        self._text: str | None = None  # the text whose tokens `seq` holds, when known exactly
        self._turn = 0
        self.strategy: StrategyConfig | None = None  # None or "single": plain sampling with `params`
        self._room = max_tokens  # tokens a turn needs after the conversation (reply, suffix, attempts)
        self._replying = False  # a reply is streaming: its sample holds `seq`
        self._recorded = False  # the streaming reply has joined the history
        self.set_strategy(strategy, unread_ok=unread_ok)

    def set_strategy(self, config: StrategyConfig | Mapping[str, Any] | None, *, unread_ok: bool = False) -> None:
        """Answer with `config` from the next turn on (None or "single": plain sampling). When the strategy
        needs more sequences than the engine has, the engine grows (within `mem_budget`), keeping the
        conversation and its KV; a strategy that cannot fit is refused here and the chat stays as it was. An
        option set that the strategy does not read is refused (as run_strategy refuses it) unless `unread_ok`:
        the chat then keeps it for the strategies a later /strategy switches to."""
        self._check_idle("change the strategy")
        if config is not None:
            config = StrategyConfig.from_caller(config, "strategy", unread_ok=unread_ok)
        # Every turn's prompt holds the system message and the template's markup: a turn that cannot fit beside
        # them is refused now, not at every message.
        floor = len(self.engine.chat_tokens([m for m in self.messages if m["role"] == "system"]
                                            + [{"role": "user", "content": ""}]))
        # What would make a turn fit: with the system message alone filling the context, no --max-tokens does.
        fix = "a shorter --system" if floor >= self.engine.n_ctx_seq else "lower --max-tokens"
        if config is None or config.strategy == "single":
            if floor + self.max_tokens > self.engine.n_ctx_seq:
                raise BudgetError(
                    f"a reply of up to {self.max_tokens} tokens after the {floor} tokens every prompt holds (the "
                    f"system message and the chat template) does not fit this chat's context of "
                    f"{self.engine.n_ctx_seq} (start the chat with a larger --ctx or {fix})")
            self.strategy, self._room = config, self.max_tokens
            return
        plan = plan_run(self.engine, None, config.with_options(max_tokens=self.max_tokens))
        if floor + plan.tokens_per_sequence > self.engine.n_ctx_seq:
            raise BudgetError(
                f"strategy {config.strategy} needs {plan.tokens_per_sequence} tokens per turn after the {floor} tokens "
                f"every prompt holds, more than this chat's context of {self.engine.n_ctx_seq} (start the chat with "
                f"a larger --ctx or {fix})"
            )
        # the conversation's own sequence is the prompt the samples fork from
        need = strategy_sequences(plan, kv_unified=self.engine.options.kv_unified)
        if need > self.engine.options.parallel:
            if self.mem_budget is not None:
                try:
                    fit(self.engine.info, self.mem_budget, ctx=self.engine.options.ctx, want=need,
                        fix="lower the strategy's budget, or start the chat with a smaller --ctx")
                except BudgetError as exc:
                    raise BudgetError(f"strategy {config.strategy} with budget {config.budget} needs {need} "
                                      f"sequences: {exc}") from None
            self.engine.resize(parallel=need, keep=[self.seq] if self.seq is not None else [])
        self.strategy, self._room = plan.config, plan.tokens_per_sequence

    def _check_idle(self, what: str) -> None:
        """Refuse to touch the conversation's sequence while a reply's sample decodes into it."""
        if self._replying:
            raise UsageError(f"cannot {what} while a reply is streaming: read it to the end, or close() its iterator")

    def close(self) -> None:
        self._check_idle("close the chat")
        if self.seq is not None:
            self.engine.release(self.seq)
            self.seq = None

    def reset(self) -> None:
        """Forget the conversation (the system message stays): the chat then answers as a new one would, its
        replies seeded from the first turn again."""
        self._check_idle("reset the chat")
        self.close()
        self._text = None
        self._turn = 0
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def _fit(self, messages: list[Message]) -> tuple[list[Message], str, list[int], int]:
        """Render and tokenize, dropping the oldest exchanges until prompt + reply fit the context."""
        dropped = 0
        while True:
            text = self.engine.chat_prompt(messages)
            tokens = self.engine.chat_tokens(messages, text=text)
            # A strategy's turn may need more than the reply: the self-eval suffix, earlier attempts (revise).
            if len(tokens) + self._room <= self.engine.n_ctx_seq:
                return messages, text, tokens, dropped
            first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
            if first is None or len(messages) - first <= 1:
                raise ContextOverflowError(
                    f"this message ({len(tokens)} tokens) plus {self._room} tokens for the reply does not fit the "
                    f"context of {self.engine.n_ctx_seq} tokens (raise --ctx or lower --max-tokens)"
                )
            # Drop the oldest user turn with the assistant reply that follows it.
            end = first + 1
            if end < len(messages) - 1 and messages[end]["role"] == "assistant":
                end += 1
            messages = messages[:first] + messages[end:]
            dropped += 1

    def send(self, text: str) -> Iterator[Event | Notice]:
        """Add a user message and stream the reply; the reply joins the history when it finishes. One reply at a
        time: a reply left unfinished is dropped once its iterator is closed (or collected)."""
        self._check_idle("send another message")
        self._replying, self._recorded = True, False
        try:
            with self.engine.busy():  # a cancel() from now on stops this reply, even one before its first token
                yield from self._reply(text)
        finally:
            self._replying = False
            if not self._recorded:  # left unfinished: the sequence holds a turn the history does not
                self._text = None

    def _reply(self, text: str) -> Iterator[Event | Notice]:
        messages, full, tokens, dropped = self._fit(self.messages + [{"role": "user", "content": text}])
        if dropped:
            yield Notice(f"dropped the {dropped} oldest exchange(s) to fit the context of {self.engine.n_ctx_seq} tokens")
        before, calls, t0 = self.engine.decoded_tokens, self.engine.decode_calls, time.perf_counter()
        if self.seq is not None and self._text is not None and full.startswith(self._text):
            # Reuse the KV exactly as generated: re-tokenizing the reply could merge tokens differently at
            # its edges and force a re-decode of the whole reply.
            tokens = list(self.seq.tokens) + self.engine.chat_tokens(messages, text=full, start=len(self._text))
        if self.seq is None:
            self.seq = self.engine.open(tokens)
        else:
            common = _common_prefix(self.seq.tokens, tokens)
            # The last prompt token must be decoded now, so that its logits are fresh.
            keep = min(common, len(tokens) - 1)
            self.engine.truncate(self.seq, keep)
            self.engine.extend([(self.seq, tokens[keep:])])
        turn = self.last = TurnStats(len(tokens), self.engine.decoded_tokens - before)
        self._turn += 1
        if self.strategy is not None and self.strategy.strategy != "single":
            cfg = self.strategy.with_options(seed=self.strategy.seed + 1000 * self._turn, max_tokens=self.max_tokens)
            self._text = full  # the sequence holds the prompt only; the samples were forks
            # checked by set_strategy; what it kept unread is for a later /strategy
            for ev in run_strategy(self.engine, tokens, cfg, root=self.seq, unread_ok=True):
                if isinstance(ev, Chosen):
                    self._record(messages, ev.text)
                elif isinstance(ev, Done):  # the run's account began after this turn's prompt was decoded
                    ev = Done(replace(ev.usage, prompt_tokens_reused=len(tokens) - turn.decoded_tokens,
                                      decode_calls=self.engine.decode_calls - calls,
                                      wall_s=time.perf_counter() - t0))
                yield ev
            return
        params = SamplingParams(**{**self.params.__dict__, "seed": self.params.seed + self._turn})
        (sample,) = self.engine.start(self.seq, [params], max_tokens=self.max_tokens, consume_root=True)
        yield SampleStarted(0, params.temperature, params.seed)
        for ev in self.engine.advance([sample]):
            if isinstance(ev, Finished):
                if ev.text or ev.reason != "cancelled":  # stopped before a word: left out, as a strategy's turn is
                    self._record(messages, ev.text)
                # The sequence now holds prompt + reply tokens; after a stop string its last token may hold some
                # of the stop string too (Engine._keep_shown), so only clean endings can be extended as text.
                self._text = full + ev.text if ev.reason in ("eos", "length") else None
            yield ev
        # As every stream ends (a strategy's turn, Engine.generate): the account of this turn, so that
        # edge_adapt.collect reads a chat reply as it reads any other.
        yield Done(Usage(prompt_tokens=len(tokens), prompt_tokens_reused=len(tokens) - turn.decoded_tokens,
                         generated_tokens=len(sample.generated), samples_started=1,
                         decode_calls=self.engine.decode_calls - calls, wall_s=time.perf_counter() - t0))

    def command(self, line: str, base: StrategyConfig | None = None) -> str | None:
        """A chat front end's slash command: what to show for it, or None for /exit. `base` holds the sampling
        settings a `/strategy` switch starts from when no strategy is set."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit", "/help", "/reset") and arg:  # `/reset all` would seem to mean something
            raise UsageError(f"{cmd} takes no argument, got {arg!r}")
        if cmd in ("/exit", "/quit"):
            return None
        if cmd == "/help":
            return CHAT_HELP
        if cmd == "/reset":
            self.reset()
            return "(conversation cleared)"
        if cmd in ("/save", "/load"):
            path, force = _file_argument(cmd, arg)
            if cmd == "/save":
                if not force and taken(path):  # said in the chat's own terms; save() says force=True
                    raise UsageError(f"{path} already exists; /save {path} --force overwrites it")
                self.save(path, force=force)
                return f"(saved to {path})"
            self.load(path)
            return f"(restored {len(self.messages)} messages)"
        if cmd == "/strategy":
            name, _, n = arg.partition(" ")
            n = n.strip()
            if n and not (n.isascii() and n.isdigit() and int(n) >= 1):  # isdigit() alone takes "²", int() not
                raise UsageError(f"/strategy NAME [BUDGET]: the budget is a whole number >= 1, got {n!r}")
            budget = int(n) if n else None
            if name == "single" and budget is not None:  # it would be kept, unread, for the next /strategy
                raise UsageError("/strategy single draws one sample: it takes no budget")
            start = self.strategy or base or StrategyConfig()
            # the settings of the strategy switched from (or base's) are kept for the next switch
            self.set_strategy(start.with_options(strategy=name or None, budget=budget), unread_ok=True)
            s, n = self.strategy, self.engine.options.parallel
            held = f"the engine holds {n} sequence{'' if n == 1 else 's'}"
            if s is None or s.strategy == "single":  # one sample: a budget would mean nothing
                return f"(strategy single; {held})"
            return f"(strategy {s.strategy}, budget {s.budget}; {held})"
        raise UsageError(f"unknown command {cmd!r}; /help lists them")

    def _record(self, messages: list[Message], reply: str) -> None:
        # Recorded before the final event is handed out, so a caller that stops reading there keeps the turn.
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self._recorded = True

    def save(self, path: str | Path, *, force: bool = False) -> None:
        """Save the conversation and its KV cache; an existing file is replaced only with `force=True`."""
        self._check_idle("save the chat")
        if self.seq is None:
            raise EdgeAdaptError("nothing to save yet: the conversation is empty")
        if not force and taken(path):  # save_snapshot's message names save_snapshot, not this method
            raise UsageError(f"{path} already exists; save(..., force=True) overwrites it")
        save_snapshot(self.engine.snapshot(self.seq), path, extra={"messages": self.messages, "turn": self._turn, "text": self._text},
                      force=force)

    def load(self, path: str | Path) -> None:
        """Restore a saved conversation. The whole file is checked against this model first; if anything is
        wrong the session is left as it was and an EdgeAdaptError says why. A state saved by an engine of another
        `parallel` is rebuilt from its tokens (Engine.restore)."""
        self._check_idle("load a conversation")
        snap, extra = load_snapshot(path)
        messages, turn, text = _chat_extra(extra, path)
        check_against(snap, path, fingerprint=self.engine.fingerprint, n_vocab=self.engine.model.n_vocab,
                      n_ctx=self.engine.n_ctx_seq)
        backup = None
        if self.seq is not None:
            try:
                backup = self.engine.snapshot(self.seq)
            except EdgeAdaptError:
                backup = None
        try:
            restored = self.engine.restore(snap, into=self.seq)
            if self.engine.ctx.seq_pos_max(restored.id) != snap.n_past - 1:
                raise EdgeAdaptError(f"{path}: snapshot state does not match its {snap.n_past} tokens")
        except EdgeAdaptError:
            self._put_back(backup)
            raise
        self.seq = restored
        self._text = text
        self.messages = messages
        self._turn = turn

    def _put_back(self, backup: Snapshot | None) -> None:
        """After a failed restore: the conversation's own KV again, or none (the next turn re-decodes it)."""
        if self.seq is None:
            return
        if backup is not None:
            try:
                self.engine.restore(backup, into=self.seq)
                return
            except EdgeAdaptError:
                pass
        self.close()
        self._text = None


def _chat_extra(extra: dict[str, object], path: str | Path) -> tuple[list[Message], int, str | None]:
    """The chat part of a snapshot: a list of {role, content} messages, a turn counter and the decoded text."""
    messages = extra.get("messages")
    if not isinstance(messages, list):
        raise EdgeAdaptError(f"{path}: snapshot holds no chat history")
    for m in messages:
        if (not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ("system", "user", "assistant")
                or not isinstance(m["content"], str)):
            raise EdgeAdaptError(f"{path}: snapshot chat history holds {str(m)[:60]!r}, not a message")
    turn = extra.get("turn", 0)
    if not is_whole(turn) or turn < 0:
        raise EdgeAdaptError(f"{path}: snapshot turn counter is {turn!r}")
    text = extra.get("text")
    if text is not None and not isinstance(text, str):
        raise EdgeAdaptError(f"{path}: snapshot text is {type(text).__name__}, not a string")
    return list(messages), turn, text


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _file_argument(cmd: str, arg: str) -> tuple[str, bool]:
    """/save's and /load's FILE: the rest of the line, spaces and backslashes as typed (a Windows path), quotes
    around it dropped, a leading ~ expanded; and whether /save was given --force, before or after it."""
    path = arg.strip()
    words = path.split()
    force = cmd == "/save" and "--force" in words[:1] + words[-1:]
    if force:
        path = (path.removeprefix("--force") if words[0] == "--force" else path.removesuffix("--force")).strip()
    options = [w for w in path.split()[:1] + path.split()[-1:] if w.startswith("--")]
    if options:
        raise UsageError(f"{cmd}: unknown option {options[0]} "
                         f"({'--force is the only one' if cmd == '/save' else 'it takes none'})")
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        path = path[1:-1]
    if not path:
        raise UsageError(f"{cmd} FILE: name the file to {cmd[1:]}")
    return os.path.expanduser(path), force  # ~ as a shell would expand it: there is no shell between
