"""The server's scheduler on the real embedded model, without HTTP: shared decode steps, the prefix cache,
cancellation, strategies, and runs that match the one-request path token for token."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import pytest

from edge_adapt.engine import Engine
from edge_adapt.engine.events import Done, Finished, Token
from edge_adapt.engine.sampling import SamplingParams
from edge_adapt.errors import BudgetError, ContextOverflowError
from edge_adapt.result import collect
from edge_adapt.selfeval import SelfEvalConfig, SelfEvaluator
from edge_adapt.server.scheduler import Job, QueueFull, Scheduler
from edge_adapt.strategies import run_strategy
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.events import Scored

from in_place import InPlaceSteps


@pytest.fixture(scope="module")
def sched() -> Iterator[Scheduler]:
    with Engine(parallel=8, ctx=256, device="cpu", threads=2) as e:
        s = Scheduler(e, max_queue=4)
        s.start()
        try:
            yield s
        finally:
            s.close()
            assert e.live_sequences == 0


def _prompt(s: Scheduler, text: str) -> list[int]:
    e = s.engine
    return e.tokenize(e.chat_prompt([{"role": "user", "content": text}]), special=True)


def _run(s: Scheduler, job: Job, timeout: float = 120) -> list[object]:
    """Submit a job and wait for its last event."""
    q: queue.Queue[object] = queue.Queue()
    s.submit(job, q.put)
    out = []
    deadline = time.monotonic() + timeout
    while True:
        item = q.get(timeout=max(0.1, deadline - time.monotonic()))
        out.append(item)
        if isinstance(item, (Done, BaseException)):
            return out


def _samples(n: int, temperature: float = 0.8, seed: int = 7) -> tuple[SamplingParams, ...]:
    return tuple(SamplingParams(temperature=temperature, seed=seed + i) for i in range(n))


def _texts(events: list[object]) -> dict[int, str]:
    return {e.sample: e.text for e in events if isinstance(e, Finished)}


def _idle(s: Scheduler, timeout: float = 2.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = s.metrics()
        if (m["requests_running"] == 0 and m["live_sequences"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.01)


def test_a_job_alone_matches_engine_generate(sched: Scheduler) -> None:
    """One request through the scheduler is the one-request path: same tokens for the same seeds."""
    prompt = _prompt(sched, "Name three colours.")
    events = _run(sched, Job(prompt, max_tokens=20, samples=_samples(3)))
    _idle(sched)
    # The prefix cache now holds this prompt; the engine's own path decodes it afresh, so free it first.
    sched._wake()
    direct = []
    with sched._cond:  # the scheduler thread is idle (waiting on the condition): the engine is ours meanwhile
        for seq in sched._cache.entries:
            sched.engine.release(seq)
        sched._cache.entries.clear()
        direct = list(sched.engine.generate(prompt, list(_samples(3)), max_tokens=20))
    assert _texts(events) == _texts(direct)
    assert isinstance(events[-1], Done) and events[-1].usage.generated_tokens == sum(
        isinstance(e, Token) for e in events)


def test_overlapping_jobs_share_decode_steps(sched: Scheduler) -> None:
    before = sched.metrics()
    qs: list[queue.Queue[object]] = [queue.Queue(), queue.Queue()]
    for i, q in enumerate(qs):
        sched.submit(Job(_prompt(sched, f"Count to {10 + i}."), max_tokens=24, samples=_samples(2, seed=i)), q.put)
    for q in qs:
        while not isinstance(item := q.get(timeout=120), (Done, BaseException)):
            pass
        assert isinstance(item, Done)
    m = _idle(sched)
    assert m["max_step_sequences"] >= 3  # more than the 2 samples of either request: they were decoded together
    steps = m["decode_steps_total"] - before["decode_steps_total"]
    seqs = m["decode_step_sequences_total"] - before["decode_step_sequences_total"]
    assert seqs / steps > 2
    assert m["live_sequences"] == 0


def test_second_turn_decodes_only_its_new_tokens(sched: Scheduler) -> None:
    e = sched.engine
    first = [{"role": "user", "content": "Say hello in French."}]
    events = _run(sched, Job(_prompt(sched, first[0]["content"]), max_tokens=12, samples=_samples(1, 0.0)))
    reply = _texts(events)[0]
    convo = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And in German?"}]
    prompt2 = e.tokenize(e.chat_prompt(convo), special=True)
    before = sched.metrics()
    done = _run(sched, Job(prompt2, max_tokens=8, samples=_samples(1, 0.0)))[-1]
    after = sched.metrics()
    assert isinstance(done, Done)
    reused = done.usage.prompt_tokens_reused
    decoded = after["prompt_tokens_decoded_total"] - before["prompt_tokens_decoded_total"]
    assert after["prefix_cache_hits_total"] == before["prefix_cache_hits_total"] + 1
    assert reused + decoded == len(prompt2)
    assert decoded <= 16  # the new user turn and the template around it, not the conversation again


def test_cancel_frees_sequences_within_a_step(sched: Scheduler) -> None:
    q: queue.Queue[object] = queue.Queue()
    ticket = sched.submit(Job(_prompt(sched, "Write a long story."), max_tokens=200, samples=_samples(4)), q.put)
    while not isinstance(q.get(timeout=120), Token):
        pass
    ticket.cancel()
    m = _idle(sched, 1.0)
    assert m["live_sequences"] == 0 and m["requests_running"] == 0


def test_strategy_job_runs_the_strategy(sched: Scheduler) -> None:
    cfg = StrategyConfig(strategy="best-of-n", budget=3, max_tokens=16, seed=3)
    prompt = _prompt(sched, "What is 2 + 3?")
    result = collect(e for e in _run(sched, Job(prompt, max_tokens=16, strategy=cfg)))
    assert result.chosen is not None and len(result.samples) == 3
    assert all(len(s.scores) == 1 for s in result.samples)
    assert result.usage.selfeval_tokens > 0
    _idle(sched)
    with sched._cond:
        for seq in sched._cache.entries:
            sched.engine.release(seq)
        sched._cache.entries.clear()
        direct = collect(run_strategy(sched.engine, prompt, cfg))
    assert [s.text for s in direct.samples] == [s.text for s in result.samples]
    assert [s.scores[0][1] for s in direct.samples] == pytest.approx([s.scores[0][1] for s in result.samples], abs=1e-4)


def test_refusals_are_immediate(sched: Scheduler) -> None:
    with pytest.raises(BudgetError, match="--parallel"):
        sched.submit(Job([1, 2, 3], max_tokens=4, samples=_samples(9)), lambda _: None)
    with pytest.raises(ContextOverflowError):
        sched.submit(Job([1] * 250, max_tokens=10, samples=_samples(1)), lambda _: None)
    with pytest.raises(BudgetError):
        sched.submit(Job([1, 2, 3], max_tokens=4, strategy=StrategyConfig(strategy="best-of-n", budget=8)), lambda _: None)


def test_strategies_are_planned_with_the_servers_own_suffix(sched: Scheduler) -> None:
    """A server scoring with a longer suffix than the request's config would (here the untrained chat question
    instead of the shipped adapter's 3 tokens) plans the room for that suffix, so a request that would overflow
    the context while scoring is refused before it starts."""
    scorer = SelfEvaluator(sched.engine, SelfEvalConfig(default_adapter=False))
    default = len(SelfEvaluator(sched.engine).suffix)
    assert len(scorer.suffix) > default
    long_suffix = Scheduler(sched.engine, scorer=scorer)  # never started: only its preflight runs
    n_ctx = sched.engine.n_ctx_seq
    job = Job([1] * (n_ctx - 16 - default), max_tokens=16,
              strategy=StrategyConfig(strategy="best-of-n", budget=2, max_tokens=16))
    assert sched._plan(job)[1].tokens_per_sequence == n_ctx
    with pytest.raises(ContextOverflowError, match="self-eval suffix"):
        long_suffix._plan(job)
    plain = Job(job.prompt, max_tokens=16, strategy=StrategyConfig(strategy="vote", budget=2, max_tokens=16))
    assert long_suffix._plan(plain)[1].suffix == 0  # a strategy that does not score reserves no suffix


def test_a_full_queue_refuses_until_waiting_requests_are_cancelled(sched: Scheduler) -> None:
    """Requests that fit in the free sequences are about to start, not waiting, even before the scheduler steps
    (concurrent clients submit between two steps); the bound is on the ones that must wait."""
    def job(n: int = 1) -> Job:
        return Job([1, 2, 3], max_tokens=2, samples=_samples(n))

    tickets = []
    with sched._cond:  # hold the scheduler still so nothing is admitted meanwhile
        with pytest.raises(QueueFull):
            for i in range(sched.capacity + sched.max_queue + 2):
                tickets.append(sched.submit(job(), lambda _: None))
        assert len(tickets) == sched.capacity + sched.max_queue
        tickets[-1].cancel()  # a client gone while waiting: its place is free before the scheduler steps again
        tickets.append(sched.submit(job(), lambda _: None))
        with pytest.raises(QueueFull):
            sched.submit(job(), lambda _: None)
        tickets[0].cancel()  # one about to start leaves: the first waiting one moves up, a place in line is free
        tickets.append(sched.submit(job(), lambda _: None))
        with pytest.raises(QueueFull):
            sched.submit(job(), lambda _: None)
        for t in tickets:
            t.cancel()
        sched.max_queue = 0
        try:  # --max-queue 0: whatever fits at once is taken, in order, and nothing more
            tickets = [sched.submit(job(3), lambda _: None), sched.submit(job(4), lambda _: None)]
            with pytest.raises(QueueFull):
                sched.submit(job(2), lambda _: None)
            tickets.append(sched.submit(job(1), lambda _: None))
            with pytest.raises(QueueFull):
                sched.submit(job(1), lambda _: None)
        finally:
            sched.max_queue = 4
            for t in tickets:
                t.cancel()
    _idle(sched)


def test_cached_prefixes_never_starve_a_running_strategy(sched: Scheduler) -> None:
    """Idle prefixes fill the free slots; an adaptive run that forks its later rounds still finds its sequences
    while another request takes the rest (cache entries give way to every running job's reservation)."""
    for i in range(6):
        assert isinstance(_run(sched, Job(_prompt(sched, f"Fact {i}?"), max_tokens=2, samples=_samples(1)))[-1], Done)
    assert sched.metrics()["prefix_cache_entries"] >= 6
    cfg = StrategyConfig(strategy="adaptive", budget=4, threshold=1.0, max_tokens=8, seed=1)  # never stops early
    qs: list[queue.Queue[object]] = [queue.Queue(), queue.Queue()]
    sched.submit(Job(_prompt(sched, "What is 7 * 6?"), max_tokens=8, strategy=cfg), qs[0].put)
    sched.submit(Job(_prompt(sched, "Name a fruit."), max_tokens=8, samples=_samples(3)), qs[1].put)
    for q in qs:
        while not isinstance(item := q.get(timeout=120), (Done, BaseException)):
            pass
        assert isinstance(item, Done), item
    m = _idle(sched)
    assert m["live_sequences"] == 0
    assert m["prefix_cache_entries"] + m["live_sequences"] <= sched.capacity


def test_a_scheduler_that_fails_outside_a_job_refuses_work_instead_of_queueing_it() -> None:
    """A bug in the scheduler's own loop (here: its decode step raising) ends the running job with ShuttingDown,
    records the cause, gives every sequence back, and later submissions are refused at once."""
    from edge_adapt.server.scheduler import ShuttingDown

    with Engine(parallel=2, ctx=128, device="cpu", threads=1) as e:
        s = Scheduler(e, max_queue=2)

        def broken(requests: object) -> None:
            raise RuntimeError("boom")

        s._decode = broken  # type: ignore[method-assign]
        s.start()
        try:
            events = _run(s, Job(_prompt(s, "Hi."), max_tokens=4, samples=_samples(1)), timeout=60)
            assert isinstance(events[-1], ShuttingDown)
            s._thread.join(timeout=30)
            assert isinstance(s.failure, RuntimeError) and str(s.failure) == "boom"
            with pytest.raises(ShuttingDown):
                s.submit(Job(_prompt(s, "Hi."), max_tokens=4, samples=_samples(1)), lambda _: None)
            assert e.live_sequences == 0
            from starlette.testclient import TestClient

            from edge_adapt.server.app import ServerState, create_app

            with TestClient(create_app(ServerState(model_id="m", scheduler=s))) as http:  # what a client sees
                r = http.get("/health")
                assert r.status_code == 503 and r.json()["error"]["code"] == "scheduler_failed"
                assert "boom" in r.json()["error"]["message"] and "retry-after" not in r.headers
        finally:
            s.close()


def test_overlapping_jobs_with_mixed_settings_each_get_what_they_get_alone() -> None:
    """Requests that share decode steps, with different temperatures, logit biases, ignore_eos, stop strings, a
    repetition penalty and top log-probabilities, each get the tokens, texts and log-probabilities they get alone:
    one request's edits of the logits (bias, masked end-of-generation) never reach another's rows. The first
    request, one sample, samples llama.cpp's buffer in place while a worker copies the step's rows (engine.outputs:
    llama.cpp on one thread leaves a core idle, and 19 rows of the default vocabulary are worth a worker); the
    others read the copy."""
    from edge_adapt.engine.device import physical_cores

    if physical_cores() < 2:
        pytest.skip("one core: llama.cpp's thread leaves none idle")
    with Engine(parallel=20, ctx=256, device="cpu", threads=1) as e:
        assert e._beside is not None
        newline, dot = e.tokenize("\n")[0], e.tokenize(".")[0]
        ask = [e.tokenize(e.chat_prompt([{"role": "user", "content": c}]), special=True)
               for c in ("Write a haiku about rain.", "List five animals, one per line.", "Count to ten.")]
        jobs = [
            Job(ask[0], max_tokens=48, top_logprobs=2, samples=(
                SamplingParams(temperature=0.8, seed=5, logit_bias=((newline, 2.0), (dot, -3.0))),)),
            Job(ask[1], max_tokens=40, stop=("\n\n",), samples=tuple(
                SamplingParams(temperature=0.6, seed=20 + i, ignore_eos=True, logit_bias=((newline, -1.0),))
                for i in range(10))),
            Job(ask[2], max_tokens=32, stop=(".",), samples=tuple(
                SamplingParams(temperature=1.0, seed=30 + i, repeat_penalty=1.2) for i in range(8))),
        ]
        in_place = InPlaceSteps(e)
        s = Scheduler(e, max_queue=4)
        qs: list[queue.Queue[object]] = [queue.Queue() for _ in jobs]
        with s._cond:  # all three admitted at the same step
            s.start()
            for job, q in zip(jobs, qs):
                s.submit(job, q.put)
        together = []
        for q in qs:
            events = []
            while not isinstance(item := q.get(timeout=120), (Done, BaseException)):
                events.append(item)
            assert isinstance(item, Done), item
            together.append(events)
        assert s.metrics()["max_step_sequences"] == 19
        s.close()
        assert e.live_sequences == 0 and in_place.count >= 10
        in_place.stop()

        def outcome(events: list[object]) -> tuple[dict[int, list[tuple[object, ...]]], list[float]]:
            """Each sample's tokens, texts and ends in order; the log-probabilities beside, compared within 1e-4."""
            by_sample: dict[int, list[tuple[object, ...]]] = {}
            logps: list[float] = []
            for ev in events:
                if isinstance(ev, Token):
                    by_sample.setdefault(ev.sample, []).append((ev.token, ev.text, [t for t, _ in ev.top]))
                    logps += [ev.logprob, *(lp for _, lp in ev.top)]
                elif isinstance(ev, Finished):
                    by_sample.setdefault(ev.sample, []).append((ev.reason, ev.text, ev.n_tokens))
            return by_sample, logps

        for job, events in zip(jobs, together):
            alone = list(e.generate(job.prompt, list(job.samples), max_tokens=job.max_tokens, stop=job.stop,
                                    top_logprobs=job.top_logprobs))
            (mine, my_logps), (theirs, their_logps) = outcome(events), outcome(alone)
            assert mine == theirs
            # The tokens are the same, so the rows are: llama.cpp may still sum a row in another order in another
            # batch (its kernels depend on the batch's size and the CPU), which moves a log-probability by far less.
            assert my_logps == pytest.approx(their_logps, abs=1e-4)


def test_a_step_whose_sampling_fails_ends_its_requests_with_the_error_and_gives_their_sequences_back(monkeypatch):
    """The scheduler samples every request's rows in one call (steps.sample_together): if that call raises, each
    request that asked ends with the error, its sequences given back, and the scheduler serves the next ones."""
    import edge_adapt.server.scheduler as scheduler_module

    real, calls = scheduler_module.sample_together, [0]

    def failing(picks):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 2:  # the second step of both requests
            raise RuntimeError("sampling broke")
        real(picks)

    monkeypatch.setattr(scheduler_module, "sample_together", failing)
    with Engine(parallel=4, ctx=128, device="cpu", threads=2) as e:
        s = Scheduler(e, max_queue=4)
        s.start()
        try:
            prompt = _prompt(s, "Name a colour.")
            qs: list[queue.Queue[object]] = [queue.Queue(), queue.Queue()]
            with s._cond:
                for i, q in enumerate(qs):
                    s.submit(Job(prompt, max_tokens=8, samples=_samples(2, seed=i)), q.put)
            for q in qs:
                while not isinstance(item := q.get(timeout=120), (Done, BaseException)):
                    pass
                assert isinstance(item, RuntimeError) and str(item) == "sampling broke"
            m = _idle(s)
            assert m["live_sequences"] == 0 and m["requests_failed_total"] == 2 and s.failure is None
            assert isinstance(_run(s, Job(prompt, max_tokens=4, samples=_samples(1)))[-1], Done)
        finally:
            s.close()
        assert e.live_sequences == 0


def test_selfeval_tokens_are_counted_as_they_are_decoded_in_a_cancelled_run(sched: Scheduler) -> None:
    """`selfeval_tokens_total` (/metrics) counts suffix tokens when they are decoded, not when a run reports them
    at its end: a run cancelled after its first scores has counted theirs."""
    suffix = len(SelfEvaluator(sched.engine).suffix)
    cfg = StrategyConfig(strategy="prune", budget=3, keep=1, prune_at=(2, 4, 6, 8), max_tokens=120, seed=1)
    before = _idle(sched)
    q: queue.Queue[object] = queue.Queue()
    ticket = sched.submit(Job(_prompt(sched, "Explain gravity in detail."), max_tokens=120, strategy=cfg), q.put)
    scored = 0
    while scored < 3:  # the first prune point scores all three samples
        item = q.get(timeout=120)
        assert not isinstance(item, (Done, BaseException)), item
        scored += isinstance(item, Scored)
    ticket.cancel()
    after = _idle(sched)
    assert after["requests_cancelled_total"] == before["requests_cancelled_total"] + 1
    assert after["selfeval_tokens_total"] - before["selfeval_tokens_total"] >= scored * suffix


def test_a_selfeval_request_counts_its_suffix_as_selfeval_tokens_not_prompt_or_reply() -> None:
    """A `MODEL:selfeval` request (a job with an adapter tail) decodes the suffix with the adapter on: those are
    self-evaluation tokens, and its one answer token is no reply's."""
    with Engine(parallel=2, ctx=128, device="cpu", threads=1) as e:
        scorer = SelfEvaluator(e)
        s = Scheduler(e, scorer=scorer)
        s.start()
        try:
            prompt = _prompt(s, "What is 2 + 2?")
            job = Job(prompt + list(scorer.suffix), max_tokens=1, samples=_samples(1, 0.0), top_logprobs=2,
                      adapter_tail=len(scorer.adapter_part))
            assert isinstance(_run(s, job)[-1], Done)
            m = _idle(s)
        finally:
            s.close()
    assert m["selfeval_tokens_total"] == len(scorer.adapter_part) > 0
    assert m["prompt_tokens_decoded_total"] == len(job.prompt) - job.adapter_tail
    assert m["tokens_generated_total"] == 0
