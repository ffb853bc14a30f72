"""The engine: one model, one llama.cpp context, many sequences.

A prompt is decoded once into a sequence; samples are forks of it (`llama_memory_seq_cp`); every live
sample advances in one batched `llama_decode` per step and reads its own row of logits; finished or
pruned samples give their sequence id back (`llama_memory_seq_rm`). Snapshots park a sequence's KV as
bytes (`llama_state_seq_get_data`) and restore it under any free id.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain, islice
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge_adapt.engine.budget import check_sequences, sequence_ids
from edge_adapt.engine.device import Device, gpu_layers_for, physical_cores
from edge_adapt.engine.events import Cancelled, Done, Event, Finished, FinishReason, SampleStarted, Token, Usage
from edge_adapt.engine.gguf_file import GGUFInfo, check_adapter_fits, inspect_gguf
from edge_adapt.engine.handles import (
    Adapter, Batch, Context, Model, free_when_collected, init_backend,
)
from edge_adapt.engine.outputs import Outputs
from edge_adapt.engine.sampling import SamplingParams, check_bias_vocabulary, stop_strings, token_logprobs, top_logprobs
from edge_adapt.engine.steps import Decode, Program, Sampling, drive
from edge_adapt.engine.text import TextStream, tokens_within
from edge_adapt.engine.vocab import TextModel, first_bad_token, same_model
from edge_adapt.errors import (
    BudgetError, ContextOverflowError, EngineError, UsageError, check_count, is_whole, not_a_bool, validated,
)

CLOSE_WAIT_S = 10.0  # how long close() waits for another thread's cancelled generation to end
ONE_THREAD = ("another thread is decoding on this engine: an engine serves one thread at a time "
              "(edge-adapt serve's scheduler shares one among many requests)")


def check_training_context(ctx: int, info: GGUFInfo) -> None:
    """Refuse a per-sequence context longer than the model was trained for (n_ctx_train 0: the GGUF does not
    say, and any length goes). Checked from the GGUF alone, so a server can refuse before it loads weights."""
    if MIN_CTX > info.n_ctx_train > 0:  # no context an engine opens fits it, whatever --ctx says
        raise BudgetError(f"the model was trained for a context of {info.n_ctx_train} tokens, fewer than the "
                          f"{MIN_CTX} an engine needs")
    if ctx > info.n_ctx_train > 0:
        raise BudgetError(f"--ctx {ctx} exceeds the model's training context {info.n_ctx_train}")


MIN_CTX = 64  # the least context per sequence an engine is opened with


class EngineOptions(BaseModel):
    """How to load a model. Desktop apps build this; the CLI fills it from flags."""

    model_config = ConfigDict(extra="forbid")

    model: Path | None = Field(None, description="GGUF file; the embedded default model when omitted")
    ctx: int = Field(2048, ge=MIN_CTX, description="context length of each sequence, in tokens")
    parallel: int = Field(1, ge=1, le=256, description="sequences the context holds at once")
    # ggml's own bound (GGML_MAX_N_THREADS): 100,000 threads crashed in llama.cpp, 20,000 hung.
    threads: int | None = Field(None, ge=1, le=512, description="CPU threads; physical cores when omitted")
    device: Device = "auto"
    gpu_layers: int | None = Field(None, ge=-1, description="layers to offload; all when a GPU is used")
    kv_unified: bool = Field(
        False, description="one KV buffer for all sequences (forks share the prompt's cells) instead of one each"
    )
    # Also the micro-batch: llama.cpp's compute buffers grow with it (10**9 was killed for memory in the constructor).
    batch: int = Field(512, ge=16, le=8192, description="tokens per llama_decode call")
    verbose: bool = False

    @field_validator("ctx", "parallel", "threads", "gpu_layers", "batch", mode="before")
    @classmethod
    def _counts_are_not_bools(cls, v: object) -> object:
        return not_a_bool(v)


class Sequence:
    """One sequence id of the context. The KV holds tokens[:n_past]; `logits` predict the token after them.

    Not a dataclass for one reason: `logits` is a property, which waits for the row's copy out of llama.cpp's
    buffer when the decode that wrote it has not been read yet (engine.outputs)."""

    __slots__ = ("id", "tokens", "n_past", "_logits", "_copying", "origin")

    def __init__(self, id: int, tokens: list[int], n_past: int = 0, logits: np.ndarray | None = None,
                 origin: Sequence | None = None) -> None:
        self.id, self.tokens, self.n_past = id, tokens, n_past
        self._logits, self._copying = logits, None
        self.origin = origin  # the opened sequence it forks from

    @property
    def logits(self) -> np.ndarray | None:
        if self._copying is not None:
            self._copying.wait()
            self._copying = None
        return self._logits

    @logits.setter
    def logits(self, row: np.ndarray | None) -> None:
        self._logits, self._copying = row, None

    def hold(self, row: np.ndarray, outputs: Outputs) -> None:
        """Take `row` of `outputs.block`, which holds it once the copy is done."""
        self._logits, self._copying = row, outputs

    @property
    def has_logits(self) -> bool:
        return self._logits is not None

    @property
    def pending(self) -> list[int]:
        return self.tokens[self.n_past :]

    def __repr__(self) -> str:
        return f"Sequence(id={self.id}, n_past={self.n_past}, tokens={len(self.tokens)})"


@dataclass
class Sample:
    """A sample being generated from a sequence: its sampler state, text stream and record."""

    index: int
    seq: Sequence
    params: SamplingParams
    max_tokens: int
    stream: TextStream
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None
    top_logprobs: int | None = None  # Token events carry this many most likely alternatives (None: none)
    dropped: int = 0  # the last generated tokens its sequence no longer holds: the stop string's that ended it

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def sum_logprob(self) -> float:
        return float(np.sum(self.logprobs)) if self.logprobs else 0.0

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / len(self.logprobs) if self.logprobs else 0.0

    def finished(self, tail: str = "") -> Finished:
        """The event of the sample's end (its finish reason set; `tail`: text no Token carried)."""
        return Finished(self.index, self.finish or "length", self.text, len(self.generated), self.sum_logprob, tail)

    def end(self, reason: FinishReason) -> Finished:
        """End the sample where it is, from outside its decode: the text held back is released in the event."""
        self.finish = reason
        return self.finished(tail=self.stream.flush())


@dataclass(frozen=True)
class Snapshot:
    """A sequence parked in RAM: its KV bytes, its tokens and its next-token logits."""

    tokens: tuple[int, ...]
    n_past: int
    state: bytes
    logits: np.ndarray | None
    model_fingerprint: str


class Engine(TextModel):
    """Owns the model, the context and the sequence ids. Use as a context manager or call close()."""

    def __init__(self, options: EngineOptions | None = None, **overrides: object) -> None:
        if options is not None and not isinstance(options, EngineOptions):
            raise UsageError(f"Engine options are an EngineOptions or keywords (Engine(ctx=1024, parallel=4)), "
                             f"got {type(options).__name__}")
        opts = validated(EngineOptions, {**(options or EngineOptions()).model_dump(), **overrides}, "engine options")
        self.options = opts
        if opts.model is None:
            from edge_adapt.engine.default_model import default_model_path

            path = default_model_path()
        else:
            path = Path(opts.model)
        self.model_path = path
        self.info: GGUFInfo = inspect_gguf(path)
        check_training_context(opts.ctx, self.info)
        init_backend(opts.verbose)
        self.threads = opts.threads or physical_cores()
        self.gpu_layers = gpu_layers_for(opts.device, opts.gpu_layers)
        self.model = Model(path, gpu_layers=self.gpu_layers)
        free_when_collected(self, self.model)
        try:
            self._make_context(opts)
        except BaseException:
            self.model.close()
            raise
        # A decode that leaves cores idle (a GPU's, or llama.cpp on fewer threads than cores) gets the sampled
        # tokens' log-probabilities computed beside it, on threads of its own, rows split among them (numpy lets
        # go of the GIL in its loops: 64 rows took 8.4 ms on one thread, 4.9 on two, 2-core VM). Where llama.cpp
        # uses every core a thread would only compete with it (measured: no gain), so they are computed in line.
        # On a GPU one core stays busy waiting for the device. At most 4: a GPU step is a few milliseconds.
        idle = physical_cores() - (1 if self.gpu_layers > 0 else self.threads)
        self._beside_workers = max(1, min(4, idle))
        self._beside = (ThreadPoolExecutor(self._beside_workers, "edge-adapt-logprobs")
                        if self.gpu_layers > 0 or idle > 0 else None)
        if self._beside is not None:
            self.model.on_close(self._beside.shutdown)
        self._cancel = threading.Event()
        # cancel() stops the work in progress: `busy` counts what is running (decodes, step programs), and a
        # cancel that finds nothing running, or outlives what it was for, is dropped instead of stopping the
        # next request. `_decoding`: one thread decodes at a time (two at once crashed inside llama.cpp).
        self._busy_count = 0
        self._busy_lock = threading.RLock()  # re-entrant: the CLI calls cancel() from a SIGINT handler
        # The threads the running work belongs to: close() from another thread waits for theirs to end (freeing
        # the context under a decode, or under a step reading its logits in place, crashed the process).
        # By Thread object, not id: Python gives a thread that has ended its id to the next one started (the
        # engine's own log-probability worker took a finished caller's, and the engine then refused every call).
        self._busy_threads: dict[threading.Thread, int] = {}
        self._idle = threading.Condition(self._busy_lock)
        self._decoding = threading.Lock()
        self._last_outputs = Outputs(np.empty((0, 0), dtype=np.float32), [])  # the last decode's logits
        self._adapters: dict[Path, Adapter] = {}
        self.decoded_tokens = 0  # every token llama.cpp has been asked to decode: tests and accounts read it
        self.moves = 0  # sequences moved to another id so that a decode's ids are consecutive (see _pack)
        self.decode_calls = 0

    @staticmethod
    def _sequence_ids(opts: EngineOptions) -> int:
        """The sequence ids a context for `opts` takes, or BudgetError where llama.cpp cannot hold them (it says
        only that it could not create the context)."""
        check_sequences(opts.parallel, opts.kv_unified)
        return sequence_ids(opts.parallel, opts.kv_unified)

    def _make_context(self, opts: EngineOptions) -> None:
        """A context (and its batch) for `opts.parallel` sequences of `opts.ctx` tokens, all of them free."""
        ids = self._sequence_ids(opts)
        ctx = Context(
            self.model,
            n_ctx=opts.ctx * ids,
            n_batch=opts.batch,
            n_seq_max=ids,
            n_threads=self.threads,
            kv_unified=opts.kv_unified,
            offload_kqv=self.gpu_layers > 0,
        )
        try:
            batch = Batch(max(opts.batch, opts.parallel))
        except BaseException:
            ctx.close()
            raise
        self.model.on_close(batch.close)
        self.options, self.ctx, self.batch = opts, ctx, batch
        self.n_ctx_seq = ctx.n_ctx_seq if not opts.kv_unified else opts.ctx
        self._free_ids = list(range(ids))  # one more than `parallel` with split KV: see budget.sequence_ids
        self._live: dict[int, Sequence] = {}  # id -> the sequence holding it
        self._pinned: set[int] = set()  # ids a scratch extension shares with its sequence: they must not move

    def resize(self, *, parallel: int | None = None, ctx: int | None = None, keep: Seq[Sequence] = ()) -> None:
        """Rebuild the context for another number of sequences or another context length, the model staying
        loaded. The sequences in `keep` move over with their tokens (their ids may change): their KV is decoded
        again in one prefill, because llama.cpp's per-sequence state records how many KV streams its context had
        and is refused by a context with another count. Every other sequence must have been released."""
        others = [s for s in self._live.values() if not any(s is k for k in keep)]
        if others:
            raise EngineError(f"cannot resize the engine while {len(others)} other sequence(s) are in use")
        opts = validated(EngineOptions, {**self.options.model_dump(), **{k: v for k, v in
                         (("parallel", parallel), ("ctx", ctx)) if v is not None}}, "resize")
        check_training_context(opts.ctx, self.info)
        for s in keep:
            self._check_held(s)
        if len({id(s) for s in keep}) < len(keep):
            raise UsageError("a sequence is listed twice in keep")
        if len(keep) > opts.parallel:
            raise BudgetError(f"{len(keep)} sequences cannot be kept in an engine of {opts.parallel}")
        if any(s.n_past > opts.ctx for s in keep):
            raise ContextOverflowError(f"a kept sequence does not fit a context of {opts.ctx} tokens")
        self._sequence_ids(opts)  # a refusal known without llama.cpp comes before anything is freed
        kept = [list(s.tokens[: s.n_past]) for s in keep]
        previous = self.options
        self._last_outputs.wait()  # a worker may be copying out of the context's buffer
        # The old KV goes before the new one is allocated; if the new context cannot be made (whatever the
        # error), the old one is made again so the engine and the kept sequences stay as they were.
        self.ctx.close()
        self.batch.close()
        try:
            self._make_context(opts)
        except BaseException:
            self._make_context(previous)
            self._decode_again(keep, kept)
            raise
        self._decode_again(keep, kept)

    def _decode_again(self, keep: Seq[Sequence], tokens: Seq[list[int]]) -> None:
        for seq, toks in zip(keep, tokens):
            seq.id, seq.tokens, seq.n_past, seq.logits = self._take_id(), [], 0, None
            self._live[seq.id] = seq
        if self._cancel.is_set():  # a cancel for the work in progress holds in the new context too
            self.ctx.request_abort(True)
        try:
            self.extend([(seq, toks) for seq, toks in zip(keep, tokens) if toks])
        except Cancelled:  # the sequences keep their tokens, undecoded: their next extend decodes them first
            for seq, toks in zip(keep, tokens):
                seq.tokens = list(toks)
            raise

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self, *, wait: float = CLOSE_WAIT_S) -> None:
        """Free the model and its context (twice is fine); using the engine afterwards raises EngineError.

        Work running on another thread (a generation a worker thread reads) is cancelled first, and the close
        waits up to `wait` seconds for that thread to read its stream to the end; if it does not, EngineError
        and the engine stays open. Work of this thread's own (a generation paused at an event) ends with
        EngineError at its next step."""
        others = self._busy_elsewhere
        with self._idle:
            if self.model.closed:
                return
            if others():
                self._cancel.set()
                self.ctx.request_abort(True)
                deadline = time.monotonic() + wait
                while others():  # woken as work ends; a slice at a time, for a thread that ends without a word
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EngineError(f"cannot close the engine: a generation on another thread was cancelled "
                                          f"but has not ended within {wait:g} s (that thread must read its events "
                                          "to the end)")
                    self._idle.wait(min(left, 0.1))
            self._last_outputs.wait()  # a worker may be copying out of the context's buffer
            self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- text: tokenize, detokenize, chat_prompt, chat_tokens, is_eog, fingerprint come from TextModel ------------
    @cached_property
    def eog_tokens(self) -> np.ndarray:
        return np.array([t for t in range(self.model.n_vocab) if self.model.is_eog(t)], dtype=np.int64)

    # -- sequences --------------------------------------------------------------------------------------
    @property
    def free_sequences(self) -> int:
        return self.options.parallel - len(self._live)

    def _take_id(self) -> int:
        if self.free_sequences < 1:
            raise BudgetError(
                f"all {self.options.parallel} sequences are in use; load the engine with a larger `parallel`"
            )
        return self._free_ids.pop(0)

    def _new(self, tokens: list[int], n_past: int = 0, logits: np.ndarray | None = None,
             origin: Sequence | None = None) -> Sequence:
        seq = Sequence(self._take_id(), tokens, n_past, logits, origin)
        self._live[seq.id] = seq
        return seq

    def open(self, tokens: Seq[int]) -> Sequence:
        """A new sequence holding `tokens`, decoded once; its logits predict what follows."""
        (tokens,) = self._token_ids([tokens], "prompt token")  # before it takes an id
        if len(tokens) == 0:
            raise UsageError("cannot open a sequence on an empty prompt")
        self._check_fits(len(tokens))
        seq = self._new([])
        try:
            self.extend([(seq, list(tokens))])
        except BaseException:
            self.release(seq)
            raise
        return seq

    def open_empty(self) -> Sequence:
        """A free sequence id holding nothing yet: a step program decodes its prompt into it (`Decode`)."""
        return self._new([])

    def holds(self, seq: Sequence) -> bool:
        """Whether `seq` still holds its sequence id (it was not released)."""
        if not isinstance(seq, Sequence):  # every call taking a sequence asks this first: one line, not AttributeError
            raise UsageError(f"expected a Sequence (from Engine.open, fork or restore), got {type(seq).__name__}")
        return self._live.get(seq.id) is seq

    @property
    def kv_cells_used(self) -> int:
        """KV cells the live sequences fill (a fork's shared cells counted once per sequence)."""
        return sum(s.n_past for s in list(self._live.values()))

    @contextmanager
    def opened(self, tokens: Seq[int]) -> Iterator[Sequence]:
        """`open` for the length of a block: on leaving it, the sequence and every sequence forked from it
        (samples, their branches) that is still held are released, however the block ends."""
        root = self.open(tokens)
        try:
            yield root
        finally:
            self.release_forks(root)
            self.release(root)

    def release_forks(self, root: Sequence) -> None:
        """Release every sequence still held that was forked from `root` (samples, their branches)."""
        for seq in [s for s in self._live.values() if s.origin is root and s is not root]:
            self.release(seq)

    def _check_held(self, seq: Sequence) -> None:
        """A released sequence's id may be another's now: decoding, forking or cutting it would corrupt that one.
        (A scratch extension on split KV is a copy of its sequence's handle, on the same, pinned id.)"""
        if not self.holds(seq) and seq.id not in self._pinned:
            raise UsageError(f"sequence {seq.id} was released; it cannot be used again")

    def fork(self, seq: Sequence) -> Sequence:
        """A copy of `seq` under a free id, sharing (unified KV) or copying (split KV) its cells."""
        self._check_held(seq)
        if seq.n_past != len(seq.tokens):
            raise EngineError("cannot fork a sequence with undecoded tokens")
        child = self._new(list(seq.tokens), seq.n_past, seq.logits, seq.origin or seq)
        self.ctx.seq_rm(child.id)
        self.ctx.seq_cp(seq.id, child.id)
        return child

    @property
    def live_sequences(self) -> int:
        return len(self._live)

    def release(self, seq: Sequence) -> None:
        """Drop a sequence's KV and give its id back for reuse (once: a later call for the same sequence, or
        for a stale copy whose id another sequence holds now, does nothing)."""
        if not self.holds(seq):
            return
        if not self.ctx.closed:  # a closed engine's KV is gone with it: only the bookkeeping is left
            try:
                self.ctx.seq_rm(seq.id)
            except EngineError:
                if not self.ctx.closed:  # not closed by another thread meanwhile
                    raise
        del self._live[seq.id]
        self._free_ids.append(seq.id)
        self._free_ids.sort()
        seq.n_past, seq.logits = 0, None

    def truncate(self, seq: Sequence, n: int) -> None:
        """Keep only the first n tokens of a sequence (its logits are gone until the next decode)."""
        self._check_held(seq)
        if not is_whole(n) or n < 0:  # a negative n set n_past below zero
            raise UsageError(f"truncate keeps n tokens, a whole number >= 0, got {n!r:.40}")
        if n < seq.n_past:
            self.ctx.seq_rm(seq.id, n, -1)
            seq.n_past = n
            seq.logits = None
        del seq.tokens[n:]

    def extend(self, updates: Seq[tuple[Sequence, Seq[int]]], meanwhile: Seq[Callable[[], None]] = ()) -> None:
        """Append tokens to several sequences and decode them together, n_batch tokens per llama_decode.

        Each sequence's logits afterwards predict the token after its last one. `meanwhile`: work that needs
        nothing from this decode, run once whatever the outcome, between the last `llama_decode` and reading
        its logits. On a GPU llama_decode returns once the work is queued and reading the logits waits for it,
        so this runs while the GPU computes; on the CPU the decode is done by then, and nothing changes.
        """
        work = list(meanwhile)
        if self.model.closed or not self._decoding.acquire(blocking=False):
            _run_all(work)
            raise EngineError("the engine is closed" if self.model.closed else ONE_THREAD)
        owner = self._work_begins()  # not `with self.busy()`: a generator-based context costs 2 us a step here
        try:
            if self.model.closed:  # by another thread, before this decode counted as work it waits for
                raise EngineError("the engine is closed")
            failed = self._extend(updates, work)
        finally:
            self._work_ends(owner)
            self._decoding.release()
            _run_all(work)  # what the decode's failure left undone
        if failed is not None:
            raise failed

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Hold the engine busy for work of several calls (a chat turn: the prompt's decode, then the reply): a
        cancel() from any thread while inside is for that work, whichever call it lands before or in, and a
        close() waits for it. The work is this thread's: while it runs (a stream paused at an event included),
        another thread's `busy` (its generate, strategy run or chat reply) gets EngineError before it touches
        anything. The work itself may go on on another thread (a stream an executor advances)."""
        owner = self._claim()
        try:
            yield
        finally:
            self._work_ends(owner)

    def _claim(self) -> threading.Thread:
        """`_work_begins`, refused while work another thread began is running: checked and counted under one lock,
        so of two threads starting at once one gets EngineError, before either has taken a sequence id. Without
        this, the second one's forks, releases and moves of ids interleaved with the first one's steps: ids leaked
        and texts changed."""
        with self._busy_lock:
            if self._busy_elsewhere():
                raise EngineError(ONE_THREAD)
            return self._work_begins()

    def _busy_elsewhere(self) -> bool:
        """Whether work another thread began is running. A stream left paused by a thread that has ended runs no
        more (until collected): it is not waited for, nor does it keep the engine from other threads for good."""
        me = threading.current_thread()
        return any(t is not me and t.is_alive() for t in self._busy_threads)

    def _work_begins(self) -> threading.Thread:
        """Count work as running; returns the thread it is counted for, which `_work_ends` is given back."""
        me = threading.current_thread()
        with self._busy_lock:
            self._busy_count += 1
            self._busy_threads[me] = self._busy_threads.get(me, 0) + 1
        return me

    def _work_ends(self, owner: threading.Thread) -> None:
        """`owner`: the thread the work began on, not the one ending it (a stream a worker started and the UI
        thread closed, or one asyncio's executor advanced on several threads): left counted, it made close()
        wait for a thread that runs nothing."""
        with self._busy_lock:
            self._busy_count -= 1
            left = self._busy_threads.pop(owner, 1) - 1
            if left > 0:
                self._busy_threads[owner] = left
            if not self._busy_count:  # a cancel that came for this work must not stop the next
                self._cancel.clear()
                if not self.model.closed:
                    self.ctx.request_abort(False)
            self._idle.notify_all()

    def _extend(self, updates: Seq[tuple[Sequence, Seq[int]]], work: list[Callable[[], None]]) -> BaseException | None:
        failed = None
        rows_tok: list[int] = []
        rows_pos: list[int] = []
        rows_seq: list[int] = []
        rows_out: list[bool] = []
        owners: list[Sequence] = []
        # Checked before anything changes: a bad id left the sequence holding what it could never decode (or
        # decoded 1.9 as 1 and recorded 1.9).
        given = [new for _, new in updates]
        news = self._token_ids(given, "token")
        if news is not given:
            updates = list(zip([seq for seq, _ in updates], news))
        for seq, new in updates:
            self._check_held(seq)
            self._check_fits(len(seq.tokens) + len(new))
            if not new and not seq.pending and not seq.has_logits:
                raise EngineError("nothing to decode and no logits: truncate one token and decode it again")
        self._pack([seq for seq, new in updates if new or seq.pending])
        # Rows go in by increasing sequence id. With one KV stream per sequence, llama.cpp cuts a batch into
        # micro-batches of consecutive ids in the order their rows come (`split_equal`, sequential): ids 1..15
        # then 0 would be two graph passes over the weights instead of one, 9% of a 16-sequence step here.
        for seq, new in sorted(updates, key=lambda u: u[0].id):
            seq.tokens.extend(new)
            todo = seq.pending
            if not todo:
                continue
            k = len(todo)
            rows_tok += todo
            rows_pos += range(seq.n_past, seq.n_past + k)
            rows_seq += [seq.id] * k
            rows_out += [False] * (k - 1) + [True]  # logits for the last token only
            owners.append(seq)
        if not rows_tok:
            return None
        tok, pos, sid, out = (np.asarray(a) for a in (rows_tok, rows_pos, rows_seq, rows_out))
        start_n_past = {s.id: s.n_past for s, _ in updates}
        rank = {id(seq): i for i, (seq, _) in enumerate(updates)}
        owner_i = 0
        try:
            for lo in range(0, len(tok), self.ctx.n_batch):
                hi = min(lo + self.ctx.n_batch, len(tok))
                self.batch.fill(tok[lo:hi], pos[lo:hi], sid[lo:hi], out[lo:hi])
                self._last_outputs.wait()  # the decode overwrites llama.cpp's buffer: the rows read from it go first
                self.ctx.decode(self.batch)
                self.decode_calls += 1
                self.decoded_tokens += hi - lo
                if hi == len(tok):
                    failed = _run_all(work)
                n_out = int(out[lo:hi].sum())
                if n_out:
                    # Rows in the callers' order (that of `updates`), not the batch's: a step then finds its
                    # sequences' rows side by side and in its own order, one view of them (Engine.steps).
                    got = owners[owner_i : owner_i + n_out]
                    order = sorted(range(n_out), key=lambda k: rank[id(got[k])])
                    outputs = Outputs(self.ctx.logits_view(n_out), order)
                    for k, row in zip(order, outputs.rows):
                        got[k].hold(row, outputs)
                    self._last_outputs = outputs
                    owner_i += n_out
        except (Cancelled, EngineError):
            # Put every sequence back exactly where it was before this call.
            for seq, new in updates:
                self.ctx.seq_rm(seq.id, start_n_past[seq.id], -1)
                seq.n_past = start_n_past[seq.id]
                del seq.tokens[len(seq.tokens) - len(new) :]
            raise
        for seq, _ in updates:
            seq.n_past = len(seq.tokens)
        return failed

    def _keep_shown(self, s: Sample) -> None:
        """A sample a stop string ended keeps in its sequence only the tokens of the text it shows: the stop
        string is not its reply, and a self-evaluation decoded after it would judge text the caller never sees
        (a token holding both the reply's end and the stop string's start stays: see tokens_within)."""
        s.dropped = len(s.generated) - tokens_within(map(self.model.piece, s.generated), s.text)
        if s.dropped:
            self.truncate(s.seq, len(s.seq.tokens) - s.dropped)

    def _token_ids(self, parts: list[Seq[int]], what: str) -> list[Seq[int]]:
        """`parts` (lists of token ids) as given when they hold ints only (every step's), else as lists of the ints
        they are (numpy's: a snapshot's JSON takes no numpy int); or a UsageError naming the first entry that is no
        token id of this model's vocabulary."""
        try:
            given = list(chain.from_iterable(parts))
        except TypeError:
            raise UsageError(f"{what}s must be given as a list of token ids") from None  # an int, None
        n_vocab = self.model.n_vocab
        if not set(map(type, given)) - {int}:  # every step's: one numpy pass over them all (a Python loop cost
            ids = np.asarray(given)            # 0.2 ms a step of 256 sequences)
            if not ids.size or (ids.min() >= 0 and ids.max() < n_vocab):
                return parts
        bad = first_bad_token(given, n_vocab)
        if bad is not None:
            raise UsageError(f"{what} {given[bad]!r:.40} is not a token id of this model's vocabulary "
                             f"(0 to {n_vocab - 1})")
        taken = iter(given)  # numpy's ids, taken one by one
        return [[int(t) for t in islice(taken, len(p))] for p in parts]  # type: ignore[call-overload]

    def _pack(self, seqs: Seq[Sequence]) -> None:
        """Move sequences between ids so that the sequences about to be decoded together hold consecutive ids.

        With one KV stream per sequence, llama.cpp decodes each run of consecutive ids as its own micro-batch, a
        whole pass over the weights: 16 sequences on ids 0, 2, ..., 30 decode at half the speed of 16 on ids
        0..15. Finished, pruned and other clients' sequences leave such holes. A move is one `seq_cp` of the
        sequence's stream (llama.cpp copies it at the next decode, this one) and a `seq_rm`; it costs about what
        a fork costs and the holes it closes would cost every following step. The window of ids that needs the
        fewest moves is taken; the sequences in it that are not decoded now move out to free ids (the context has
        an id more than `parallel` for this, budget.sequence_ids). Nothing moves where a move would touch a
        scratch extension's id.
        """
        seqs = list({id(s): s for s in seqs}.values())
        if self.options.kv_unified or len(seqs) < 2:
            return
        ids = sorted(s.id for s in seqs)
        k = len(ids)
        if ids[-1] - ids[0] + 1 == k or any(self._live.get(s.id) is not s for s in seqs):
            return  # one run already, or a sequence the engine does not hold as such (a scratch copy)
        n = self.ctx.n_seq_max
        decoding = np.zeros(n, dtype=np.int64)
        decoding[ids] = 1
        others = np.zeros(n, dtype=np.int64)
        others[[i for i in self._live if not decoding[i]]] = 1
        pinned = np.zeros(n, dtype=np.int64)
        pinned[list(self._pinned)] = 1

        def window_sums(a: np.ndarray) -> np.ndarray:  # sum of a over [lo, lo + k) for every lo
            c = np.concatenate([[0], np.cumsum(a)])
            return c[k:] - c[:-k]

        moving_in = k - window_sums(decoding)
        moving_out = window_sums(others)
        stuck = window_sums(pinned * others) + (pinned * decoding).sum() - window_sums(pinned * decoding)
        cost = np.where(stuck > 0, n + 1, moving_in + moving_out)
        lo = int(cost.argmin())
        if cost[lo] > n or (moving_out[lo] and not self._free_ids):
            return
        inside = range(lo, lo + k)
        leave = [self._live[i] for i in inside if others[i]]
        enter = [s for s in seqs if s.id not in inside]
        while leave or enter:
            free_out = [i for i in self._free_ids if i not in inside]
            if leave and free_out:
                self._move(leave.pop(), free_out[0])
            else:  # every slot out of the window is taken, so one inside is free (see the count above)
                self._move(enter.pop(), next(i for i in self._free_ids if i in inside))

    def _move(self, seq: Sequence, to: int) -> None:
        self.ctx.seq_rm(to)
        self.ctx.seq_cp(seq.id, to)
        self.ctx.seq_rm(seq.id)
        del self._live[seq.id]
        self._free_ids.remove(to)
        self._free_ids.append(seq.id)
        self._free_ids.sort()
        seq.id = to
        self._live[to] = seq
        self.moves += 1

    def _check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.n_ctx_seq:
            raise ContextOverflowError(
                f"{n_tokens} tokens do not fit the context of {self.n_ctx_seq} tokens per sequence "
                "(raise --ctx or shorten the prompt)"
            )

    @contextmanager
    def scratch(self, seqs: Seq[Sequence]) -> Iterator[list[Sequence]]:
        """Throw-away extensions of `seqs`: whatever is decoded into them is gone afterwards.

        With a unified KV the scratch is a fork (`seq_cp` shares the cells, no copy); with split KV a
        fork would copy the whole stream, so the scratch extends the sequence in place and removes the
        extra positions afterwards. Either way the original KV, tokens and logits are untouched.
        """
        cheap_fork = self.options.kv_unified and self.free_sequences >= len(seqs)
        if cheap_fork:
            tmp = [self.fork(s) for s in seqs]
        else:
            tmp = [Sequence(s.id, list(s.tokens), s.n_past, s.logits) for s in seqs]
            pinned = {s.id for s in seqs} - self._pinned
            self._pinned |= pinned
        try:
            yield tmp
        finally:
            if cheap_fork:
                for t in tmp:
                    self.release(t)
            else:
                self._pinned -= pinned
                for s in seqs:
                    self.ctx.seq_rm(s.id, s.n_past, -1)

    # -- snapshots -------------------------------------------------------------------------------------
    def snapshot(self, seq: Sequence) -> Snapshot:
        self._check_held(seq)
        if seq.n_past != len(seq.tokens):
            raise EngineError("cannot snapshot a sequence with undecoded tokens")
        if self.ctx.copies_pending and seq.n_past:
            self._apply_copies(seq)
        return Snapshot(
            tuple(seq.tokens), seq.n_past, self.ctx.state_seq_get(seq.id),
            None if seq.logits is None else seq.logits.copy(), self.fingerprint,
        )

    def _apply_copies(self, seq: Sequence) -> None:
        """Make llama.cpp apply its pending stream copies (a fork's, a move's) with a decode on `seq` that leaves
        it as it was: one token appended and taken back, or, at a full context, its last token decoded again."""
        n, logits = seq.n_past, seq.logits
        if n < self.n_ctx_seq:
            self.extend([(seq, [seq.tokens[-1]])])
        else:
            last = seq.tokens[-1]
            self.truncate(seq, n - 1)
            self.extend([(seq, [last])])
        self.truncate(seq, n)
        seq.logits = logits

    def restore(self, snap: Snapshot, into: Sequence | None = None) -> Sequence:
        """Bring a snapshot back under a free id (or into an existing sequence, replacing its content).

        llama.cpp's sequence state records the KV layout of the context it was taken from (one stream per
        sequence): an engine of another `parallel` refuses it. The snapshot's tokens are then decoded again, in
        one prefill, which gives the same KV."""
        if not isinstance(snap, Snapshot):  # a file's name, most likely: Engine works in memory
            raise UsageError(f"restore takes a Snapshot (load_snapshot(path) reads a file), got {type(snap).__name__}")
        if not same_model(snap.model_fingerprint, self.fingerprint):
            raise EngineError(f"snapshot is from another model ({snap.model_fingerprint}, this is {self.fingerprint})")
        self._check_fits(snap.n_past)
        if into is not None:  # its id may be another sequence's now, whose KV the restore would replace
            self._check_held(into)
        seq = into or self._new([])
        self.ctx.seq_rm(seq.id)
        try:
            self.ctx.state_seq_set(seq.id, snap.state)
        except EngineError:
            self.ctx.seq_rm(seq.id)
            seq.tokens, seq.n_past, seq.logits = [], 0, None
            try:
                if snap.tokens:
                    self.extend([(seq, list(snap.tokens))])
            except BaseException:
                if into is None:
                    self.release(seq)
                raise
            return seq
        seq.tokens, seq.n_past = list(snap.tokens), snap.n_past
        seq.logits = None if snap.logits is None else snap.logits.copy()
        return seq

    # -- adapters --------------------------------------------------------------------------------------
    def load_adapter(self, path: Path) -> Adapter:
        path = Path(path)
        if path not in self._adapters:
            check_adapter_fits(self.info, inspect_gguf(path, expect="adapter"))  # by name, not "could not load"
            self._adapters[path] = Adapter(self.model, path)
        return self._adapters[path]

    @contextmanager
    def adapter(self, adapter: Adapter | None, scale: float = 1.0) -> Iterator[None]:
        """Switch an adapter on for the decodes inside the block only; generation outside stays the base model's."""
        if adapter is None:
            yield
            return
        self.ctx.set_adapters([adapter], [scale])
        try:
            yield
        finally:
            self.ctx.set_adapters([], [])

    # -- sampling ---------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the generation in progress (safe from any thread); it ends with finish reason 'cancelled'.
        With nothing in progress it does nothing."""
        with self._busy_lock:
            if self._busy_count and not self.model.closed:
                self._cancel.set()
                self.ctx.request_abort(True)

    def start(
        self,
        root: Sequence,
        params: Seq[SamplingParams],
        *,
        max_tokens: int,
        stop: Seq[str] = (),
        first_index: int = 0,
        consume_root: bool = False,
        top_logprobs: int | None = None,
    ) -> list[Sample]:
        """Fork one sample per entry of `params` from a decoded prompt sequence.

        With `consume_root` the last sample takes the prompt's own sequence instead of a fork: one id less
        when no more samples will be drawn from that prompt. With `top_logprobs` k, every Token event carries
        the k most likely tokens of its step and their log-probabilities.
        """
        check_count("max_tokens", max_tokens)
        if not params or not all(isinstance(p, SamplingParams) for p in params):
            raise UsageError("give one SamplingParams per sample")
        if top_logprobs is not None and (not is_whole(top_logprobs) or not 0 <= top_logprobs <= self.model.n_vocab):
            raise UsageError(f"top_logprobs must be between 0 and the vocabulary's {self.model.n_vocab}, got {top_logprobs}")
        stop = stop_strings(stop)
        forks = len(params) - (1 if consume_root else 0)
        if forks > self.free_sequences:
            raise BudgetError(
                f"{len(params)} samples need {forks} free sequences, {self.free_sequences} are left "
                f"(the engine holds {self.options.parallel})"
            )
        if root.logits is None:
            raise EngineError("the prompt sequence has no logits to sample from")
        check_bias_vocabulary(params, self.model.n_vocab)
        seqs = [self.fork(root) for _ in range(forks)] + ([root] if consume_root else [])
        return [
            Sample(first_index + i, seq, p, max_tokens, TextStream(tuple(stop)), np.random.default_rng(p.seed),
                   top_logprobs=top_logprobs)
            for i, (seq, p) in enumerate(zip(seqs, params))
        ]

    def branch(self, parent: Sample, params: Seq[SamplingParams], *, first_index: int = 0) -> list[Sample]:
        """Fork a paused sample into one child per entry of `params`: each child's KV is a copy of the
        parent's (`seq_cp`, nothing decoded again) and it carries the parent's tokens, log-probabilities and
        text, so it reads as the parent's continuation. The parent is left as it is; release it when done."""
        if parent.finish is not None:
            raise EngineError(f"sample {parent.index} has finished ({parent.finish}); it cannot be continued")
        if len(params) > self.free_sequences:
            raise BudgetError(
                f"branching into {len(params)} samples needs {len(params)} free sequences, {self.free_sequences} "
                f"are left (the engine holds {self.options.parallel})"
            )
        children = []
        for i, p in enumerate(params):
            children.append(Sample(
                first_index + i, self.fork(parent.seq), p, parent.max_tokens, parent.stream.copy(),
                np.random.default_rng(p.seed),
                list(parent.generated), list(parent.logprobs),
            ))
        return children

    def advance(
        self, samples: Seq[Sample], until: int | None = None, *, max_new: int | None = None, pause_on: str | None = None
    ) -> Iterator[Event]:
        """`steps`, each step decoded at once: the events of one caller's generation."""
        yield from drive(self, self.steps(samples, until, max_new=max_new, pause_on=pause_on))

    def steps(
        self, samples: Seq[Sample], until: int | None = None, *, max_new: int | None = None, pause_on: str | None = None
    ) -> Program[None]:
        """Generate for all unfinished samples, one batched decode per step, until each has `until` tokens,
        hits max_tokens, a stop string or an end-of-generation token: a step program (edge_adapt.engine.steps)
        that yields a `Sampling` request for each step's tokens (its driver picks them, with other programs' rows where
        there are), then those tokens as one `Decode` request, and the events.

        Steps: with `max_new` a sample pauses after that many new tokens, with `pause_on` after a token
        whose text contains that string (a reasoning step's end). A paused sample is not finished: the
        next `advance` (or `branch`) continues it.

        Sampled tokens other than end-of-generation are decoded into the sample's KV even on the last
        step, so a finished sample can be scored or continued without decoding anything again.
        """
        # While the program lives, paused at a yield included, a cancel() is for it. Counted, not claimed: a
        # strategy's round or a chat's reply starts its steps on whichever thread advances the work that claimed
        # the engine (generate, run_strategy, ChatSession.send).
        owner = self._work_begins()
        try:
            yield from self._steps(samples, until, max_new=max_new, pause_on=pause_on)
        finally:
            self._work_ends(owner)

    def _steps(
        self, samples: Seq[Sample], until: int | None = None, *, max_new: int | None = None, pause_on: str | None = None
    ) -> Program[None]:
        # A cancel is not cleared here: it is for all the work in progress (a strategy run holds the engine busy
        # from start to end), and is cleared when that ends (_work_ends).
        limit = {id(s): min(s.max_tokens, until if until is not None else s.max_tokens,
                            len(s.generated) + max_new if max_new is not None else s.max_tokens) for s in samples}
        live = [s for s in samples if s.finish is None and len(s.generated) < limit[id(s)]]
        paused: set[int] = set()
        while live:
            if self.model.closed:  # closed while this program was paused at a yield
                raise EngineError("the engine is closed")
            if self._cancel.is_set():
                yield from self._finish_all(live, "cancelled")
                return
            recent = None
            if any(s.params.repeat_penalty != 1.0 for s in live):
                recent = [np.asarray(s.seq.tokens[-s.params.repeat_last_n :]) if s.params.repeat_penalty != 1.0
                          else np.empty(0, int) for s in live]
            # Where a worker is idle and the rows are many (a GPU's step), the rows of the last decode, not yet read:
            # the step samples from llama.cpp's buffer in place while workers copy the rows out (engine.outputs),
            # and computes the log-probabilities on the copy. The columns edited for this step are put back once it
            # is done with them, since they are the sequences' own rows (a finished sample keeps its).
            fresh = self._in_place(live)
            if fresh is not None:
                outputs, lo, view, inv = fresh  # live[inv[r]] reads view[r] (inv None: live[r] does)
                in_view = live if inv is None else [live[i] for i in inv]
                edits = self._edit(view, in_view, keep=True)
                undo = edits if inv is None else [((inv[at_rows], cols), values) for (at_rows, cols), values in edits]
                outputs.copy(self._beside, self._beside_workers)  # the edited rows: the log-probabilities' input
                picking = Sampling(view, [s.params for s in in_view], [s.rng for s in in_view],
                                   recent if recent is None or inv is None else [recent[i] for i in inv])
                logits = outputs.block[lo : lo + len(live)]
            else:
                rows: list[np.ndarray] = [s.seq.logits for s in live]  # type: ignore[misc]
                # Rows of one decode in the order it wrote them are taken as a view (no copy of them all)
                logits = self._side_by_side(rows)
                borrowed = logits is not None
                if logits is None:
                    logits = np.stack(rows)
                undo = self._edit(logits, live, keep=borrowed)
                picking = Sampling(logits, [s.params for s in live], [s.rng for s in live], recent)
                outputs, inv = None, None
            yield picking  # the driver samples (with other programs' rows: steps.sample_together)
            assert picking.tokens is not None
            tokens = picking.tokens
            if inv is not None:
                tokens[inv] = tokens.copy()
            # What to decode does not depend on the log-probabilities: they are computed beside the decode where
            # it leaves a core idle (see _logprobs), and the step's events follow the decode.
            logps = self._logprobs(logits, tokens, after=outputs)
            picked = tokens.tolist()
            to_decode: list[tuple[Sequence, list[int]]] = []
            leaving: list[tuple[Sequence, list[int]]] = []
            for s, t in zip(live, picked):
                s.generated.append(t)
                if self.model.is_eog(t):
                    s.finish = "eos"
                elif len(s.generated) < limit[id(s)]:
                    to_decode.append((s.seq, [t]))
                else:
                    leaving.append((s.seq, [t]))
            # The samples that go on first: the decode hands rows out in this order, so next step's rows are side
            # by side again when some samples stop between others (see _side_by_side). Those a stop string
            # or a pause ends are known once the text is, after this.
            to_decode += leaving
            stepped: list[tuple[Sample, int, str]] = []  # one per live sample, in row order
            lps: list[float] = []
            tops: list[tuple[tuple[int, float], ...]] = []

            def settle() -> None:
                """The step's text, ends and log-probabilities: nothing here needs the decode, which a GPU
                computes meanwhile (Engine.extend)."""
                for s, t in zip(live, picked):
                    if s.finish == "eos":
                        stepped.append((s, t, s.stream.flush()))
                        continue
                    text, stopped = s.stream.push(self.model.piece(t))
                    if stopped:
                        s.finish = "stop"
                    elif len(s.generated) >= s.max_tokens:
                        s.finish = "length"
                        text += s.stream.flush()
                    stepped.append((s, t, text))
                    if not s.finish and pause_on is not None and pause_on in text:
                        paused.add(id(s))
                lps.extend(logps().tolist())
                tops.extend(top_logprobs(logits[row], s.top_logprobs) if s.top_logprobs else ()
                            for row, s in enumerate(live))
                for at, values in undo:
                    logits[at] = values

            cancelled = False
            if to_decode:
                try:
                    yield Decode.of(to_decode, meanwhile=settle)
                except Cancelled:
                    cancelled = True
            if not stepped:  # no decode, or a driver that did not run it
                settle()
            for (s, t, text), lp, top in zip(stepped, lps, tops):
                s.logprobs.append(lp)
                yield Token(s.index, t, text, lp, top)
                if s.finish == "eos" or (s.finish and not cancelled):
                    if s.finish == "stop":
                        self._keep_shown(s)
                    yield s.finished()
            if cancelled:
                # The interrupted step's tokens were recorded but not decoded: forget them too.
                for seq, _ in to_decode:
                    sample = next(x for x in live if x.seq is seq)
                    sample.generated.pop()
                    sample.logprobs.pop()
                    sample.finish = None
                yield from self._finish_all([s for s in live if s.finish is None], "cancelled")
                return
            live = [s for s in live if s.finish is None and len(s.generated) < limit[id(s)] and id(s) not in paused]

    def _in_place(self, live: list[Sample]) -> tuple[Outputs, int, np.ndarray, np.ndarray | None] | None:
        """Where the samples' rows are rows lo..lo+n-1 of the last decode's, whose copy has not started, and lie
        side by side in llama.cpp's buffer too: (those outputs, lo, the rows there, and for each row there the
        sample that owns it, None where that is live[r] for row r). None otherwise. Looks at the rows without
        waiting for any copy."""
        outputs = self._last_outputs
        if self._beside is None or outputs.started or not outputs.worth_a_worker:
            return None  # the copy would be made in line: reading it costs no more
        lo = outputs.span([s.seq._logits for s in live])
        if lo is None:
            return None
        n = len(live)
        where = outputs.order[lo : lo + n]
        a = min(where)
        if max(where) - a + 1 != n:
            return None
        if where == list(range(a, a + n)):
            return outputs, lo, outputs.view[a : a + n], None
        inv = np.empty(n, dtype=np.intp)
        inv[np.asarray(where) - a] = np.arange(n)
        return outputs, lo, outputs.view[a : a + n], inv

    def _side_by_side(self, rows: list[np.ndarray]) -> np.ndarray | None:
        """`rows` as one (n, n_vocab) view when they are rows lo..lo+n-1 of the last decode's logits, in that
        order, else None."""
        lo = self._last_outputs.span(rows)
        return None if lo is None else self._last_outputs.block[lo : lo + len(rows)]

    def _edit(self, logits: np.ndarray, live: list[Sample], *,
              keep: bool) -> list[tuple[tuple[np.ndarray, np.ndarray], np.ndarray]]:
        """Mask end-of-generation tokens and add logit biases, in place, one numpy operation for all the rows
        that ask for the same (a request's samples do, whatever their seeds). With `keep`, return what to put
        back afterwards: (where, the values there before)."""
        groups: dict[tuple[bool, tuple[tuple[int, float], ...]], list[int]] = {}
        for row, s in enumerate(live):
            if s.params.ignore_eos or s.params.logit_bias:
                groups.setdefault((s.params.ignore_eos, s.params.logit_bias), []).append(row)
        undo = []
        for (ignore_eos, logit_bias), rows in groups.items():
            at_rows = np.array(rows)[:, None]
            if keep:
                cols = np.array([*(self.eog_tokens if ignore_eos else ()), *(t for t, _ in logit_bias)], dtype=np.int64)
                undo.append(((at_rows, cols), logits[at_rows, cols]))
            if ignore_eos:
                logits[at_rows, self.eog_tokens] = -np.inf
            for token, bias in logit_bias:
                logits[rows, token] += bias
        return undo

    def _logprobs(self, logits: np.ndarray, tokens: np.ndarray,
                  after: Outputs | None = None) -> Callable[[], np.ndarray]:
        """The tokens' log-probabilities under `logits`, read by calling what this returns (`logits` stay untouched
        until then): computed in line, or beside the decode in one range of rows per worker. `after`: the copy
        that fills `logits`, made on those workers (a step reading llama.cpp's buffer in place, Engine._in_place)."""
        if self._beside is None:
            done = token_logprobs(logits, tokens)
            return lambda: done

        def part(a: int, b: int) -> np.ndarray:
            if after is not None:
                after.wait()
            return token_logprobs(logits[a:b], tokens[a:b])

        n, k = len(tokens), min(self._beside_workers, len(tokens))
        bounds = [i * n // k for i in range(k + 1)]
        parts = [self._beside.submit(part, a, b) for a, b in zip(bounds, bounds[1:])]
        if k == 1:
            return parts[0].result
        return lambda: np.concatenate([p.result() for p in parts])

    def _finish_all(self, samples: Seq[Sample], reason: FinishReason) -> Iterator[Event]:
        for s in samples:
            yield s.end(reason)

    def generate(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | Seq[SamplingParams] = SamplingParams(),
        *,
        n: int = 1,
        max_tokens: int = 256,
        stop: str | Seq[str] = (),
        top_logprobs: int | None = None,
    ) -> Iterator[Event]:
        """Decode the prompt once, fork `n` samples and stream their tokens. Sample i uses seed + i (a list of
        params: one sample each, `n` unused). `stop`: a string or several; a sample ends before the first."""
        # The claim comes first: while another thread's work runs, this gets EngineError, not an error about
        # the sequences that work holds. Busy to the end: a close from another thread waits for it.
        with self.busy():
            check_count("max_tokens", max_tokens)  # before it is added to the prompt's length
            if isinstance(params, SamplingParams):
                check_count("n", n)
                if n > self.free_sequences:  # before n params are made: n may be a typo of many digits
                    raise BudgetError(f"{n} samples need {n} free sequences, {self.free_sequences} are left "
                                      f"(the engine holds {self.options.parallel})")
                plist = [SamplingParams(**{**params.__dict__, "seed": params.seed + i}) for i in range(n)]
            elif isinstance(params, (list, tuple)):
                plist = list(params)
            else:
                raise UsageError(f"params must be a SamplingParams or a list of them, got {type(params).__name__}")
            tokens = self.tokenize(prompt) if isinstance(prompt, str) else token_list(prompt)
            if len(tokens) + max_tokens > self.n_ctx_seq:  # named by what would make it fit
                fix = "shorten the prompt" if len(tokens) >= self.n_ctx_seq else "lower max_tokens"
                raise ContextOverflowError(
                    f"prompt ({len(tokens)}) + max_tokens ({max_tokens}) = {len(tokens) + max_tokens} tokens exceed "
                    f"the context of {self.n_ctx_seq} per sequence ({fix} or raise --ctx)")
            started = (time.perf_counter(), self.decode_calls)
            with self.opened(tokens) as root:
                yield from drive(self, self.generation(root, plist, max_tokens=max_tokens, stop=stop,
                                                       top_logprobs=top_logprobs, started=started))

    def generation(
        self,
        root: Sequence,
        params: Seq[SamplingParams],
        *,
        max_tokens: int,
        stop: Seq[str] = (),
        top_logprobs: int | None = None,
        reused: int = 0,
        started: tuple[float, int] | None = None,
    ) -> Program[None]:
        """The step program of plain sampling from a decoded prompt: one sample per entry of `params`, the
        last taking the prompt's own sequence (which then holds prompt + its reply when it ends); the stream
        ends with Done(usage). `reused`: prompt tokens that were already in the KV (a prefix cache's); `started`:
        (perf_counter, decode_calls) when the request began, if before this program (its prompt's decode)."""
        t0, calls0 = started or (time.perf_counter(), self.decode_calls)
        n_prompt = len(root.tokens)
        samples = self.start(root, params, max_tokens=max_tokens, stop=stop, consume_root=True,
                             top_logprobs=top_logprobs)
        for s in samples:
            yield SampleStarted(s.index, s.params.temperature, s.params.seed)
        yield from self.steps(samples)
        yield Done(Usage(prompt_tokens=n_prompt, prompt_tokens_reused=reused,
                         generated_tokens=sum(len(s.generated) for s in samples), samples_started=len(samples),
                         decode_calls=self.decode_calls - calls0, wall_s=time.perf_counter() - t0))


def token_list(prompt: object) -> list[int]:
    """A prompt given as token ids, as a list; bytes (which iterate as small ints) are refused, not read as ids."""
    if isinstance(prompt, (bytes, bytearray, memoryview)) or not isinstance(prompt, (list, tuple, np.ndarray)):
        raise UsageError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}")
    return list(prompt)


def _run_all(work: list[Callable[[], None]]) -> BaseException | None:
    """Run and remove each callable of `work`, all of them even if one raises; the first error, if any."""
    failed = None
    while work:
        try:
            work.pop(0)()
        except Exception as e:  # noqa: BLE001 - handed back to the caller, which raises it when consistent
            failed = failed or e
    return failed
