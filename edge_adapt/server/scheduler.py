"""The scheduler: one thread owns the engine and decodes every admitted request's sequences in shared steps.

Each request is a step program (edge_adapt.engine.steps): plain sampling (`Engine.generation`) or a strategy
run (`strategy_steps`), the same code the CLI and the Python API drive one at a time. A scheduler step runs
every running program to its next `Decode` request, then decodes all of them together (`decode_together`:
one batch for the base model, one more for the self-evaluation suffixes that need the adapter), so two
clients' samples, one client's prefill and another's self-evaluation share the same `llama_decode` calls.

Admission: a request reserves the sequences its plan holds at once (its samples and its prompt's own); it is
admitted while the reservations of the running requests leave room, else it waits in a FIFO queue (full:
`QueueFull`); one that could never fit is refused at `submit`. So a running strategy always finds the
sequences it forks.

Prefix cache: when a request ends, the sequence that held its prompt (for plain sampling: the prompt and the
last choice's reply) is kept, with its KV, in slots no running request has reserved. A new request takes the
entry with the longest common token prefix, cuts it there and decodes only the rest: a chat client's second
turn decodes only its new tokens. Entries are evicted least recently used first when slots are needed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from edge_adapt.engine.engine import Engine, Sequence
from edge_adapt.engine.events import Token
from edge_adapt.engine.sampling import SamplingParams, check_bias_vocabulary
from edge_adapt.engine.steps import Decode, Program, Sampling, decode_together, sample_together, watched
from edge_adapt.errors import BudgetError, ContextOverflowError, EdgeAdaptError, UsageError
from edge_adapt.selfeval import SelfEvaluator
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.auto import check_scorer
from edge_adapt.strategies.run import RunPlan, check_fits, plan_run, strategy_steps

R = TypeVar("R")


class QueueFull(EdgeAdaptError):
    """`max_queue` requests are already waiting."""


class ShuttingDown(EdgeAdaptError):
    """The scheduler is closing: new requests are refused and the running ones end with this."""


@dataclass(frozen=True)
class Job:
    """One request: a prompt (token ids) and either plain samples (one SamplingParams per choice) or a strategy."""

    prompt: list[int]
    max_tokens: int
    samples: tuple[SamplingParams, ...] = ()
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # Token events carry this many alternatives (None: none)
    strategy: StrategyConfig | None = None  # a strategy run (its own budget, max_tokens, stop, seed); samples unused
    # A self-eval request: the prompt's last `adapter_tail` tokens (its self-eval suffix's adapter part) are
    # decoded with the scheduler's self-eval adapter on, as an activated LoRA does; the rest is the base model's.
    adapter_tail: int = 0


@dataclass(frozen=True)
class _SuffixDecode(Decode):
    """A self-evaluation suffix's decode: `_decode` counts its tokens once they are decoded (selfeval_tokens_total),
    whether or not the run they score ever ends."""


def _suffix(d: Decode) -> _SuffixDecode:
    return _SuffixDecode(d.updates, d.adapter, d.scale, d.meanwhile)


class _Scorer(SelfEvaluator):
    """A job's self-evaluation, its suffix decodes marked as such for the scheduler's count."""

    def steps(self, samples: Seq[Any]) -> Program[list[float]]:
        return _suffix_decodes(super().steps(samples))


def _suffix_decodes(program: Program[R]) -> Program[R]:
    """`yield from program`, each Decode it yields marked as a _SuffixDecode."""
    return watched(program, mark=_suffix)


class Ticket:
    """A submitted job: `cancel()` from any thread frees its sequences at the next step."""

    def __init__(self, scheduler: Scheduler, job: Job, sink: Callable[[object], None], need: int,
                 plan: RunPlan | None) -> None:
        self.job, self.sink, self.need, self.plan = job, sink, need, plan
        self._scheduler = scheduler
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        self._scheduler._wake()


@dataclass
class _Running:
    ticket: Ticket
    program: Program[None] = field(init=False)  # made from the _Running itself (it records the root there)
    root: Sequence | None = None
    error: BaseException | None = None  # thrown into the program at its next resume


@dataclass
class _Counters:
    decode_steps_total: int = 0
    decode_step_sequences_total: int = 0
    last_step_sequences: int = 0
    max_step_sequences: int = 0
    tokens_generated_total: int = 0
    selfeval_tokens_total: int = 0
    prompt_tokens_decoded_total: int = 0
    prefix_cache_hits_total: int = 0
    prefix_tokens_reused_total: int = 0
    requests_total: int = 0
    requests_failed_total: int = 0
    requests_cancelled_total: int = 0


@dataclass
class PrefixCache:
    """Idle sequences kept with their KV, least recently used first."""

    entries: list[Sequence] = field(default_factory=list)

    def best(self, prompt: Seq[int]) -> tuple[Sequence | None, int]:
        """The entry sharing the longest token prefix with `prompt`, and that length (0: none shares any)."""
        best, best_n = None, 0
        want = np.asarray(prompt)
        for seq in self.entries:
            have = np.asarray(seq.tokens[: seq.n_past])
            m = min(len(have), len(want))
            same = have[:m] == want[:m]
            n = m if same.all() else int(np.argmin(same))
            if n > best_n:
                best, best_n = seq, n
        return best, best_n


class Scheduler:
    """Runs jobs on `engine` from one thread (`start` / `close`); `submit` from any thread."""

    def __init__(self, engine: Engine, *, max_queue: int = 64, prefix_cache: bool = True,
                 scorer: SelfEvaluator | None = None) -> None:
        self.engine = engine
        self.scorer = scorer  # its adapter serves the jobs with an adapter_tail
        self.capacity = engine.options.parallel
        self.max_queue = max_queue
        self.prefix_cache = prefix_cache
        self._cond = threading.Condition()
        self._queue: list[Ticket] = []
        self._running: list[_Running] = []
        self._reserved = 0  # sequences reserved by running jobs
        self._cache = PrefixCache()
        self._counters = _Counters()
        self._closing = False
        # What stopped the scheduler's thread when it was not a close(): requests are refused from then on.
        self.failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- any thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edge-adapt-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Cancel every job, stop the thread and give every sequence back (the engine stays open)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._shutdown()

    def submit(self, job: Job, sink: Callable[[object], None]) -> Ticket:
        """Queue a job; `sink` gets its events on the scheduler's thread, ending with Done(usage) or the
        exception that ended it. Raises at once what can never run (too long, too many sequences) and
        QueueFull when `max_queue` jobs wait."""
        need, plan = self._plan(job)
        ticket = Ticket(self, job, sink, need, plan)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            # The bound is on requests that wait: one that fits at once is never refused (--max-queue 0 works).
            waiting, fits_now = self._waiting(ticket)
            if waiting >= self.max_queue and not fits_now:
                raise QueueFull(f"{waiting} requests are already waiting (--max-queue {self.max_queue})")
            self._queue.append(ticket)
            self._cond.notify_all()
        return ticket

    def metrics(self) -> dict[str, float]:
        with self._cond:
            c = self._counters
            live = self.engine.live_sequences
            return {
                "requests_queued": float(len(self._queue)),
                "requests_running": float(len(self._running)),
                "live_sequences": float(live - len(self._cache.entries)),
                "prefix_cache_entries": float(len(self._cache.entries)),
                "kv_cells_used": float(self.engine.kv_cells_used),
                "sequences_capacity": float(self.capacity),
                **{k: float(v) for k, v in vars(c).items()},
            }

    def _plan(self, job: Job) -> tuple[int, RunPlan | None]:
        """The sequences a job holds at once, checked against what the engine can ever give it."""
        if not job.prompt:
            raise UsageError("the prompt is empty")
        n_ctx = self.engine.n_ctx_seq
        if job.strategy is not None:
            # The suffix this server scores with (its --adapter's), which the request's config does not know.
            suffix = len(self.scorer.suffix) if self.scorer is not None else None
            plan = plan_run(self.engine, job.prompt, job.strategy, suffix=suffix)
            check_fits(plan, n_ctx, client=True)
            if plan.config.strategy == "auto" and self.scorer is not None:  # a 400 now, not an error mid-stream
                check_scorer(plan.config, self.scorer)
            need = plan.sequences
            what = (f"strategy {job.strategy.strategy} with budget {job.strategy.budget} holds {plan.samples} samples "
                    f"and the prompt's own sequence at once: {need} sequences")
        else:
            if not job.samples:
                raise UsageError("a job needs at least one sample")
            if len(job.prompt) + job.max_tokens > n_ctx:
                raise ContextOverflowError(
                    f"prompt ({len(job.prompt)}) + max_tokens ({job.max_tokens}) = {len(job.prompt) + job.max_tokens} "
                    f"tokens exceed the context of {n_ctx} per sequence"
                )
            check_bias_vocabulary(job.samples, self.engine.model.n_vocab)  # at once, not when the job starts
            plan, need = None, len(job.samples)
            what = f"n={need} holds {need} sequences at once (the last choice takes the prompt's)"
            if job.adapter_tail and (self.scorer is None or not 0 < job.adapter_tail < len(job.prompt)):
                raise UsageError("this server scores no self-evaluation suffix of that length")
        if need > self.capacity:
            raise BudgetError(f"{what}; the server holds {self.capacity} (--parallel)")
        return need, plan

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the scheduler's thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._running and not self._queue:
                        self._cond.wait()
                    if self._closing:
                        break
                    self._admit()
                self._drop_cancelled()
                requests: list[tuple[_Running, Decode]] = []
                waiting = list(self._running)
                while waiting:  # each program to its decode request, the samplings of all of them at once
                    picks: list[tuple[_Running, Sampling]] = []
                    for run in waiting:
                        item = self._resume(run)
                        if isinstance(item, Sampling):
                            picks.append((run, item))
                        elif item is not None:
                            requests.append((run, item))
                    if picks:
                        try:
                            sample_together([p for _, p in picks])
                        except Exception as e:  # noqa: BLE001 - thrown into those programs at their yield: they fail
                            for run, _ in picks:
                                run.error = e
                    waiting = [run for run, _ in picks]
                if requests:
                    self._decode(requests)
                elif not self._running:
                    with self._cond:  # the queue head waits for slots no one will free: nothing to do but wait
                        if self._queue and not self._can_admit(self._queue[0]):
                            self._cond.wait(0.05)
        except BaseException as e:  # a bug outside any one job: say so, and refuse work rather than queue it forever
            self.failure = e
            logging.getLogger("edge_adapt.server").error("the scheduler stopped: %r", e, exc_info=e)
        finally:
            self._shutdown()

    def _waiting(self, ticket: Ticket) -> tuple[int, bool]:
        """How many queued requests will have to wait, and whether `ticket` would start at the next step (lock
        held). The queue starts in order while requests fit, so the ones submitted since the last step that fit
        in the free sequences are about to start, not waiting. Cancelled ones (clients gone while waiting) leave
        the queue at the next step and hold no place in it."""
        free, waiting = self.capacity - self._reserved, 0
        for t in self._queue:
            if t.cancelled.is_set():
                continue
            if waiting or t.need > free:
                waiting += 1
            else:
                free -= t.need
        return waiting, not waiting and ticket.need <= free

    def _can_admit(self, ticket: Ticket) -> bool:
        return self._reserved + ticket.need <= self.capacity

    def _admit(self) -> None:
        """Start queued jobs in order while they fit (called with the lock held)."""
        while self._queue:
            ticket = self._queue[0]
            if ticket.cancelled.is_set():
                self._queue.pop(0)
                self._counters.requests_cancelled_total += 1
                continue
            if not self._can_admit(ticket):
                return
            self._queue.pop(0)
            self._reserved += ticket.need
            self._counters.requests_total += 1
            run = _Running(ticket)
            run.program = self._program(run)
            self._running.append(run)

    def _program(self, run: _Running) -> Program[None]:
        """A job's step program: its prompt into a sequence (from the prefix cache when one shares a prefix),
        then plain sampling or the strategy run, from that sequence."""
        job = run.ticket.job
        base = job.prompt[: len(job.prompt) - job.adapter_tail]
        root, reused = self._root_for(base)
        run.root = root
        rest = base[reused:]
        self._counters.prompt_tokens_decoded_total += len(rest)  # the adapter tail: suffix tokens
        step = self.engine.options.batch
        for lo in range(0, len(rest), step):  # a long prompt in slices: other requests go on decoding between them
            yield Decode.of([(root, rest[lo : lo + step])])
        if job.adapter_tail:
            assert self.scorer is not None  # _plan refused the job otherwise
            yield _suffix(Decode.of([(root, job.prompt[len(base):])], self.scorer.adapter,
                                    self.scorer.config.adapter_scale))
        if run.ticket.plan is not None:
            plan = run.ticket.plan
            scorer = None
            if plan.spec.needs_scorer:
                # The server's self-evaluation (its --adapter), a scorer of its own (it counts this job's tokens).
                scorer = _Scorer(self.engine, self.scorer.config if self.scorer else plan.config.self_eval)
            yield from strategy_steps(self.engine, plan, scorer, root, reused=reused)
        else:
            yield from self.engine.generation(root, job.samples, max_tokens=job.max_tokens, stop=job.stop,
                                              top_logprobs=job.top_logprobs, reused=reused)

    def _root_for(self, prompt: list[int]) -> tuple[Sequence, int]:
        """A sequence holding a prefix of `prompt` (the longest the cache has), and that prefix's length.

        An entry that is all prefix of the prompt (a conversation's earlier turns) becomes the root; one that
        goes on differently (a shared system prompt, then another client's question) is forked and the fork
        cut, so the entry stays for others. Entries live only in slots no running job has reserved (this
        one's included), oldest evicted first, so a running strategy always finds the sequences it forks."""
        entry, common = self._cache.best(prompt) if self.prefix_cache else (None, 0)
        # The last prompt token is decoded again unless the entry holds exactly the prompt with its logits:
        # its logits are what the first sample draws from.
        if entry is not None and not (common == len(prompt) == entry.n_past and entry.has_logits):
            common = min(common, len(prompt) - 1)
        if entry is None or common == 0:
            self._evict()
            return self.engine.open_empty(), 0
        self._cache.entries.remove(entry)
        self._evict()
        if common < entry.n_past and len(self._cache.entries) + 1 + self._reserved <= self.capacity:
            root = self.engine.fork(entry)
            root.origin = None  # a root of its own: its samples are released with it, not with the entry
            self._cache.entries.append(entry)  # most recently used
        else:
            root = entry
        if common < root.n_past:
            self.engine.truncate(root, common)
        self._counters.prefix_cache_hits_total += 1
        self._counters.prefix_tokens_reused_total += common
        return root, common

    def _evict(self) -> None:
        while self._cache.entries and len(self._cache.entries) + self._reserved > self.capacity:
            self.engine.release(self._cache.entries.pop(0))

    def _resume(self, run: _Running) -> Decode | Sampling | None:
        """Run a job's program to its next decode or sampling request, handing its events to the sink; None once it
        ended."""
        sink = run.ticket.sink
        while True:
            try:
                if run.error is not None:
                    error, run.error = run.error, None
                    item = run.program.throw(error)
                else:
                    item = next(run.program)
            except StopIteration:
                self._end(run)
                return None
            except Exception as e:  # the job failed; the others go on
                self._counters.requests_failed_total += 1
                self._end(run)
                _deliver(sink, e)
                return None
            if isinstance(item, (Decode, Sampling)):
                return item
            # A self-eval request's one token is its answer to the suffix, not a reply's.
            if isinstance(item, Token) and not run.ticket.job.adapter_tail:
                self._counters.tokens_generated_total += 1
            _deliver(sink, item)

    def _decode(self, requests: list[tuple[_Running, Decode]]) -> None:
        decodes = [d for _, d in requests]
        errors = decode_together(self.engine, decodes)
        c = self._counters
        for (run, d), err in zip(requests, errors):
            run.error = err
            if err is None and isinstance(d, _SuffixDecode):
                c.selfeval_tokens_total += sum(len(tokens) for _, tokens in d.updates)
        seqs = len({s.id for d in decodes for s, _ in d.updates})  # a scoring scratch shares its sample's id
        c.decode_steps_total += 1
        c.decode_step_sequences_total += seqs
        c.last_step_sequences = seqs
        c.max_step_sequences = max(c.max_step_sequences, seqs)

    def _drop_cancelled(self) -> None:
        for run in [r for r in self._running if r.ticket.cancelled.is_set()]:
            run.program.close()  # its finally blocks give back its samples' sequences
            self._counters.requests_cancelled_total += 1
            self._end(run)

    def _end(self, run: _Running) -> None:
        """A job is over: its forks are released and its prompt's sequence goes to the prefix cache."""
        run.program.close()
        root = run.root
        if root is not None:
            self.engine.release_forks(root)
            live = self.engine.holds(root)
            keep = len(run.ticket.job.prompt) - run.ticket.job.adapter_tail
            if live and run.ticket.job.adapter_tail and root.n_past >= keep:
                self.engine.truncate(root, keep)  # the adapter's KV must never serve a base-model request
            if live and self.prefix_cache and root.n_past == len(root.tokens) and root.n_past > 0:
                self._cache.entries.append(root)
            elif live:
                self.engine.release(root)
        with self._cond:
            self._running.remove(run)
            self._reserved -= run.ticket.need
            self._cond.notify_all()

    def _shutdown(self) -> None:
        """Every running and queued job ends with ShuttingDown (its sequences given back), the cache is emptied, and
        later submissions are refused."""
        with self._cond:
            self._closing = True
        closing = ShuttingDown("the server is shutting down")
        for run in list(self._running):
            run.ticket.cancelled.set()
            _deliver(run.ticket.sink, closing)
        self._drop_cancelled()
        with self._cond:
            for ticket in self._queue:
                _deliver(ticket.sink, closing)
            self._queue.clear()
        for seq in self._cache.entries:
            self.engine.release(seq)
        self._cache.entries.clear()


def _deliver(sink: Callable[[object], None], item: object) -> None:
    try:
        sink(item)
    except Exception:  # a client's sink must not take the scheduler down
        pass

