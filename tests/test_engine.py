"""The engine on the embedded model: forks, batching, snapshots and scratch extensions."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edge_adapt.engine import GREEDY, Done, Engine, Finished, SamplingParams
from edge_adapt.engine.snapshot_file import load_snapshot, save_snapshot
from edge_adapt.errors import BudgetError, ContextOverflowError, EngineError, UsageError

from in_place import InPlaceSteps

PROMPT = [{"role": "user", "content": "Write two sentences about rivers."}]
SAMPLED = SamplingParams(temperature=0.9, seed=11)


def _prompt(engine: Engine) -> list[int]:
    return engine.tokenize(engine.chat_prompt(PROMPT))


def _tokens_alone(engine: Engine, tokens: list[int], params: SamplingParams, n: int) -> list[int]:
    root = engine.open(tokens)
    (s,) = engine.start(root, [params], max_tokens=n, consume_root=True)
    list(engine.advance([s]))
    engine.release(s.seq)
    return s.generated


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_fork_continues_like_fresh_sequence(engine: Engine, params: SamplingParams):
    tokens = _prompt(engine)
    fresh = _tokens_alone(engine, tokens, params, 24)
    root = engine.open(tokens)
    (forked,) = engine.start(root, [params], max_tokens=24)  # a seq_cp fork; root stays
    list(engine.advance([forked]))
    engine.release(forked.seq)
    engine.release(root)
    assert forked.generated == fresh


def test_batch_of_8_gives_each_sample_its_text_alone(engine: Engine):
    tokens = _prompt(engine)
    batched = {e.sample: e.text for e in engine.generate(tokens, SAMPLED, n=8, max_tokens=32)
               if isinstance(e, Finished)}
    assert len(set(batched.values())) > 1, "different seeds should give different samples"
    for i in range(8):
        params = SamplingParams(temperature=SAMPLED.temperature, seed=SAMPLED.seed + i)
        alone = [e.text for e in engine.generate(tokens, params, n=1, max_tokens=32) if isinstance(e, Finished)]
        assert alone == [batched[i]], f"sample {i} differs when run alone"


def test_generation_decodes_the_prompt_once_for_all_samples(engine: Engine):
    tokens = _prompt(engine)
    before = engine.decoded_tokens
    done = [e for e in engine.generate(tokens, SAMPLED, n=8, max_tokens=16) if isinstance(e, Finished)]
    decoded = engine.decoded_tokens - before
    generated = sum(e.n_tokens for e in done)
    assert decoded <= len(tokens) + generated  # forks copy the prompt's KV instead of decoding it 8 times


def test_snapshot_restored_into_another_sequence_continues_identically(engine: Engine, tmp_path):
    tokens = _prompt(engine)
    root = engine.open(tokens)
    (s,) = engine.start(root, [SAMPLED], max_tokens=40, consume_root=True)
    list(engine.advance([s], until=12))
    snap = engine.snapshot(s.seq)
    rng_at_snapshot = copy.deepcopy(s.rng)
    save_snapshot(snap, tmp_path / "s.snap", extra={"note": "x"})
    list(engine.advance([s]))
    expected = s.generated[12:]

    loaded, extra = load_snapshot(tmp_path / "s.snap")
    assert extra == {"note": "x"} and loaded.tokens == snap.tokens
    engine.release(s.seq)
    moved = engine.restore(loaded)  # whatever id is free now
    (cont,) = engine.start(moved, [SAMPLED], max_tokens=28, consume_root=True)
    cont.rng = rng_at_snapshot
    list(engine.advance([cont]))
    engine.release(cont.seq)
    assert cont.generated == expected


def test_snapshot_into_a_different_id_while_original_lives(engine: Engine):
    tokens = _prompt(engine)
    a = engine.open(tokens)
    b = engine.restore(engine.snapshot(a))
    assert a.id != b.id
    np.testing.assert_array_equal(a.logits, b.logits)
    ga = _continue_greedy(engine, a, 10)
    gb = _continue_greedy(engine, b, 10)
    engine.release(a)
    engine.release(b)
    assert ga == gb


def _continue_greedy(engine: Engine, seq, n: int) -> list[int]:
    (s,) = engine.start(seq, [GREEDY], max_tokens=n, consume_root=True)
    list(engine.advance([s]))
    return s.generated


def test_scratch_extension_leaves_the_sequence_untouched(engine: Engine):
    tokens = _prompt(engine)
    plain = _tokens_alone(engine, tokens, SAMPLED, 30)

    root = engine.open(tokens)
    (s,) = engine.start(root, [SAMPLED], max_tokens=30, consume_root=True)
    list(engine.advance([s], until=10))
    logits_before = s.seq.logits.copy()
    with engine.scratch([s.seq]) as (tmp,):
        engine.extend([(tmp, engine.tokenize("<|im_end|>\n<|im_start|>user\nAre you sure?"))])
        assert tmp.logits is not None and not np.array_equal(tmp.logits, logits_before)
    np.testing.assert_array_equal(s.seq.logits, logits_before)
    list(engine.advance([s]))
    engine.release(s.seq)
    assert s.generated == plain


def test_finished_sample_kv_holds_prompt_and_response(engine: Engine):
    tokens = _prompt(engine)
    root = engine.open(tokens)
    (s,) = engine.start(root, [GREEDY], max_tokens=8, consume_root=True)
    list(engine.advance([s]))
    assert s.finish == "length"
    assert s.seq.tokens == tokens + s.generated
    assert engine.ctx.seq_pos_max(s.seq.id) == len(tokens) + len(s.generated) - 1
    engine.release(s.seq)


def test_released_ids_are_reused(engine: Engine):
    seqs = [engine.open([1, 2, 3]) for _ in range(engine.options.parallel)]
    assert engine.free_sequences == 0
    with pytest.raises(Exception, match="in use"):
        engine.open([1, 2, 3])
    engine.release(seqs[3])
    again = engine.open([4, 5])
    assert again.id == seqs[3].id
    for s in seqs[:3] + seqs[4:] + [again]:
        engine.release(s)


def test_cancel_from_another_thread_ends_with_cancelled(engine: Engine):
    import threading

    tokens = _prompt(engine)
    events = engine.generate(tokens, SAMPLED, n=4, max_tokens=200)
    seen = 0
    done = []
    for ev in events:
        seen += 1
        if seen == 10:
            threading.Thread(target=engine.cancel).start()
        if isinstance(ev, Finished):
            done.append(ev)
    assert len(done) == 4 and all(d.reason == "cancelled" for d in done)
    # The engine stays usable afterwards.
    assert _tokens_alone(engine, tokens, GREEDY, 4)


def test_an_abort_requested_before_a_decode_stops_it_and_the_engine_goes_on(engine: Engine):
    """The flag llama.cpp polls between graph nodes (handles.AbortFlag, read in C) reaches the decode."""
    from edge_adapt.engine.events import Cancelled
    from edge_adapt.engine.handles import AbortFlag

    flag = AbortFlag()
    assert not flag.callback(flag.data)
    flag.set()
    assert flag.callback(flag.data) and flag.is_set()
    flag.set(False)
    assert not flag.callback(flag.data)

    tokens = _prompt(engine)
    free = engine.free_sequences
    engine.ctx.request_abort(True)
    try:
        with pytest.raises(Cancelled, match="the generation was cancelled"):  # a message an app can show
            engine.open(tokens)
        assert engine.free_sequences == free
    finally:
        engine.ctx.request_abort(False)
    assert _tokens_alone(engine, tokens, GREEDY, 4)


def test_prompt_longer_than_context_is_refused(engine: Engine):
    from edge_adapt.errors import ContextOverflowError

    with pytest.raises(ContextOverflowError, match=r"exceed the context of 256 per sequence \(shorten the prompt or raise --ctx\)"):
        list(engine.generate(list(range(1000, 1300)), GREEDY, max_tokens=4))


# -- steps and branches (beam search) ---------------------------------------------------------------------
@pytest.mark.parametrize("ctx, words", [(64, 100), (200, 240)])
def test_a_context_llama_cpp_rounds_up_takes_a_prompt_longer_than_asked_for(ctx: int, words: int):
    """llama.cpp rounds a context up to a multiple of 256 but caps its batch at the size asked for: a prompt
    between the two was decoded in one batch over that cap, and llama.cpp aborted the process."""
    with Engine(parallel=1, ctx=ctx, threads=1) as e:
        prompt = e.tokenize("word " * words)
        assert ctx < len(prompt) <= e.n_ctx_seq and e.ctx.n_batch == ctx
        out = list(e.generate(prompt, GREEDY, max_tokens=4))
        assert isinstance(out[-1], Done) and out[-1].usage.generated_tokens == 4


def test_advance_pauses_at_a_step_end_and_resumes(engine: Engine):
    tokens = engine.tokenize(engine.chat_prompt([{"role": "user", "content": "List three fruits, one per line."}]))
    whole = _tokens_alone(engine, tokens, GREEDY, 40)
    root = engine.open(tokens)
    (s,) = engine.start(root, [GREEDY], max_tokens=40, consume_root=True)
    list(engine.advance([s], max_new=6))
    assert len(s.generated) == 6 and s.finish is None  # paused, not finished
    list(engine.advance([s], pause_on="\n"))
    if s.finish is None:
        assert "\n" in engine.detokenize(s.generated[-1:])  # stopped on the token that ends the line
    list(engine.advance([s]))
    engine.release(s.seq)
    assert s.generated == whole  # pausing changes nothing about what is generated


def test_beam_expansion_continues_exactly_like_its_parent(engine: Engine):
    tokens = _prompt(engine)
    root = engine.open(tokens)
    (parent,) = engine.start(root, [GREEDY], max_tokens=30, consume_root=True)
    list(engine.advance([parent], max_new=10))
    kids = engine.branch(parent, [GREEDY, GREEDY], first_index=1)
    decoded = engine.decoded_tokens
    assert [k.generated for k in kids] == [parent.generated] * 2 and kids[0].text == parent.text
    assert [k.seq.n_past for k in kids] == [parent.seq.n_past] * 2
    list(engine.advance([parent] + kids))
    assert engine.decoded_tokens - decoded == 3 * 20  # only the 20 new tokens each: nothing of the shared past
    for s in [parent] + kids:
        engine.release(s.seq)
    assert kids[0].generated == kids[1].generated == parent.generated


def test_freeing_pruned_beams_returns_their_memory(engine: Engine):
    root = engine.open(_prompt(engine))
    (parent,) = engine.start(root, [SAMPLED], max_tokens=20, consume_root=True)
    list(engine.advance([parent], max_new=8))
    free = engine.free_sequences
    kids = engine.branch(parent, [SAMPLED] * 4, first_index=1)
    list(engine.advance(kids, max_new=4))
    assert engine.free_sequences == free - 4
    assert all(engine.ctx.seq_pos_max(k.seq.id) >= 8 for k in kids)
    ids = [k.seq.id for k in kids]
    for k in kids:
        engine.release(k.seq)
    assert engine.free_sequences == free
    assert all(engine.ctx.seq_pos_max(i) == -1 for i in ids)  # their KV cells are empty again
    engine.release(parent.seq)


def test_opened_gives_back_the_root_and_every_fork_of_it(engine: Engine):
    free = engine.free_sequences
    other = engine.open(_prompt(engine))  # not forked from the opened root: it stays
    with pytest.raises(RuntimeError):
        with engine.opened(_prompt(engine)) as root:
            samples = engine.start(root, [GREEDY, SAMPLED], max_tokens=4)
            list(engine.advance(samples))
            engine.branch(engine.start(root, [SAMPLED], max_tokens=8)[0], [SAMPLED])  # a fork of a fork
            assert engine.free_sequences == free - 6
            raise RuntimeError("the block fails")
    assert engine.free_sequences == free - 1 and engine.live_sequences == 1
    engine.release(other)
    engine.release(other)  # a second release of the same sequence does nothing
    assert engine.free_sequences == free


def test_generate_ends_with_done_and_its_usage(engine: Engine):
    from edge_adapt.engine import Done, Token

    calls = engine.decode_calls
    events = list(engine.generate(_prompt(engine), SAMPLED, n=3, max_tokens=6))
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    u = events[-1].usage
    assert u.generated_tokens == sum(isinstance(e, Token) for e in events) == sum(
        e.n_tokens for e in events if isinstance(e, Finished))
    assert u.samples_started == 3 and u.prompt_tokens == len(_prompt(engine))
    assert u.decode_calls == engine.decode_calls - calls and u.wall_s > 0


def test_resize_keeps_a_sequence_and_continues_it_identically():
    with Engine(parallel=1, ctx=256, device="cpu") as e:
        tokens = _prompt(e)
        alone = _tokens_alone(e, tokens, GREEDY, 12)
        seq = e.open(tokens)
        logits = seq.logits.copy()
        e.resize(parallel=4, keep=[seq])
        # Decoded again in one prefill, as `open` decoded it: the same logits.
        assert e.options.parallel == 4 and e.free_sequences == 3 and seq.tokens == tokens
        assert np.array_equal(seq.logits, logits)
        samples = e.start(seq, [GREEDY, GREEDY], max_tokens=12)
        list(e.advance(samples))
        assert [s.generated for s in samples] == [alone, alone]
        for s in samples:
            e.release(s.seq)
        with pytest.raises(Exception, match="other sequence"):
            e.resize(parallel=2)  # `seq` is still held and not kept
        e.release(seq)
        e.resize(parallel=2, ctx=512)
        assert e.free_sequences == 2 and e.n_ctx_seq >= 512


def test_a_resize_refused_for_too_many_sequences_leaves_the_engine_and_the_kept_sequence_as_they_were():
    """256 sequences take more sequence ids than llama.cpp has: the refusal came after the old context was freed,
    and the engine was left with no context (a chat's next turn failed with an AttributeError)."""
    with Engine(parallel=1, ctx=256, device="cpu") as e:
        tokens = _prompt(e)
        alone = _tokens_alone(e, tokens, GREEDY, 8)
        seq = e.open(tokens)
        logits = seq.logits.copy()
        with pytest.raises(BudgetError, match="sequence ids"):
            e.resize(parallel=256, keep=[seq])
        assert (e.options.parallel, e.free_sequences, seq.tokens) == (1, 0, tokens)
        assert np.array_equal(seq.logits, logits)
        assert _continue_greedy(e, seq, 8) == alone


def _params(i: int) -> SamplingParams:
    return SamplingParams(temperature=SAMPLED.temperature, seed=SAMPLED.seed + i)


def test_sequences_decoded_together_move_to_consecutive_ids_and_continue_identically(engine: Engine):
    """With a KV stream per sequence, llama.cpp splits a decode at every hole in its ids (a weight pass each),
    so the engine moves sequences to close the holes: neither the moved nor the waiting ones may change."""
    tokens = _prompt(engine)
    alone = [_tokens_alone(engine, tokens, _params(i), 20) for i in range(6)]
    root = engine.open(tokens)
    samples = engine.start(root, [_params(i) for i in range(6)], max_tokens=20, consume_root=True)
    assert [s.seq.id for s in samples] == [1, 2, 3, 4, 5, 0]
    moves = engine.moves
    first = samples[0::2]  # ids 1, 3, 5: three runs
    list(engine.advance(first, until=10))
    ids = sorted(s.seq.id for s in first)
    assert ids == list(range(ids[0], ids[0] + 3)) and engine.moves > moves
    list(engine.advance(samples))
    assert [s.generated for s in samples] == alone
    for s in samples:
        engine.release(s.seq)


def test_a_scratch_extension_keeps_its_id_while_other_sequences_are_packed(engine: Engine):
    """A scratch extension shares its sequence's id (split KV): packing must not move that sequence away under it."""
    tokens = _prompt(engine)
    suffix = engine.tokenize("<|im_end|>\n<|im_start|>user\nAre you sure?")
    alone = [_tokens_alone(engine, tokens, _params(i), 12) for i in range(5)]
    root = engine.open(tokens)
    samples = engine.start(root, [_params(i) for i in range(5)], max_tokens=12, consume_root=True)
    held = samples[1]
    assert held.seq.id == 2 and sorted(s.seq.id for s in samples if s is not held) == [0, 1, 3, 4]
    with engine.scratch([held.seq]) as (tmp,):
        engine.extend([(tmp, suffix[:3])])
        # Ids 0, 1, 3, 4 decode together; moving id 2 out would take one move, but it is the scratch's.
        list(engine.advance([s for s in samples if s is not held], until=6))
        assert held.seq.id == 2
        engine.extend([(tmp, suffix[3:])])  # the scratch goes on where it was
        with_scratch = tmp.logits.copy()
    with engine.scratch([held.seq]) as (tmp,):
        engine.extend([(tmp, suffix)])
        # Equal bits on the CPU this was written on; another CPU's kernels may round a split decode differently,
        # while a scratch on the wrong KV would be off by whole logits.
        np.testing.assert_allclose(tmp.logits, with_scratch, atol=0.05)
    list(engine.advance(samples))
    assert [s.generated for s in samples] == alone
    for s in samples:
        engine.release(s.seq)


def test_a_decode_hands_each_caller_its_rows_in_the_callers_order(engine: Engine):
    """Logits rows come back in the order of `extend`'s updates, not by sequence id: each sequence still gets
    its own, whichever order the updates name them in."""
    tokens = _prompt(engine)
    the, river, flows = (engine.tokenize(w)[0] for w in (" The", " river", " flows"))
    news = {"a": [the, flows], "b": [the], "c": [river]}
    expected = {}
    for name, new in news.items():
        with engine.opened(tokens + new) as alone:
            expected[name] = alone.logits.copy()
    with engine.opened(tokens) as a:
        b, c = engine.fork(a), engine.fork(a)
        seqs = {"a": a, "b": b, "c": c}
        assert a.id < b.id < c.id
        engine.extend([(seqs[name], news[name]) for name in ("c", "a", "b")])
        for name, seq in seqs.items():
            # Batched and alone give equal bits on the CPU this was written on (another CPU's kernels may round
            # a batch differently, by far less than 0.1); another sequence's row is off by 15 logits or more.
            np.testing.assert_allclose(seq.logits, expected[name], atol=0.1)
            others = [other for other in expected if other != name]
            assert all(np.abs(seq.logits - expected[other]).max() > 1 for other in others)
        engine.release(b)
        engine.release(c)


def test_a_step_that_edits_its_rows_in_place_puts_them_back(engine: Engine):
    """A step reads its samples' rows of logits as one view of the decode's array, edits them (logit_bias,
    ignore_eos) and puts the edited columns back: a fork sharing a row, which waits, sees the model's logits."""
    tokens = _prompt(engine)
    eos = int(engine.eog_tokens[0])
    params = [SamplingParams(temperature=0.0, ignore_eos=True, logit_bias=((eos, 5.0), (300, 7.0))),
              SamplingParams(temperature=0.0, logit_bias=((300, -3.0),))]
    root = engine.open(tokens)
    samples = engine.start(root, params, max_tokens=8, consume_root=True)
    list(engine.advance(samples, max_new=2))  # both paused, their rows side by side in one array
    (waiting,) = engine.branch(samples[0], [GREEDY])
    assert waiting.seq.logits is samples[0].seq.logits
    before = samples[0].seq.logits.copy(), samples[1].seq.logits.copy()
    list(engine.advance(samples, max_new=1))
    np.testing.assert_array_equal(waiting.seq.logits, before[0])
    assert np.isfinite(waiting.seq.logits[engine.eog_tokens]).all()
    list(engine.advance(samples))
    for s in [*samples, waiting]:
        engine.release(s.seq)


def test_biased_samples_batched_give_each_its_text_alone(engine: Engine):
    """Samples of one request share their logit edits (one numpy operation on the step's rows in place, put back
    afterwards): batched, each still gives what it gives alone, the biased token's log-probabilities included."""
    tokens = _prompt(engine)
    biased = SamplingParams(temperature=0.9, seed=5, logit_bias=((engine.tokenize(" the")[0], 4.0), (300, -2.0)))

    def run(params: SamplingParams, n: int) -> dict[int, tuple[str, float]]:
        return {e.sample: (e.text, round(e.sum_logprob, 4)) for e in engine.generate(tokens, params, n=n, max_tokens=20)
                if isinstance(e, Finished)}

    batched = run(biased, 4)
    for i in range(4):
        alone = run(SamplingParams(**{**biased.__dict__, "seed": biased.seed + i}), 1)
        assert alone[0][0] == batched[i][0], f"sample {i} differs when run alone"
        # Equal here; another CPU's kernels may round a batch differently, by far less than 0.05 over 20 tokens
        # (a wrong bias, applied twice or left on, moves it by whole nats).
        assert alone[0][1] == pytest.approx(batched[i][1], abs=0.05)


def test_work_given_to_a_decode_runs_once_whatever_the_decode_does(engine: Engine):
    """`extend(meanwhile=...)` runs the work once between llama_decode and reading the logits (on a GPU, while it
    computes); after a failed decode too; an error of the work comes after the engine has settled the decode."""
    from edge_adapt.errors import ContextOverflowError

    tokens = _prompt(engine)
    ran: list[int] = []
    with engine.opened(tokens) as seq:
        token = int(np.argmax(seq.logits))
        engine.extend([(seq, [token])], meanwhile=[lambda: ran.append(len(ran))])
        assert ran == [0] and seq.n_past == len(tokens) + 1

        def boom() -> None:
            raise RuntimeError("the work failed")

        with pytest.raises(RuntimeError, match="the work failed"):
            engine.extend([(seq, [token])], meanwhile=[boom, lambda: ran.append(len(ran))])
        assert ran == [0, 1]  # the rest of the work ran all the same
        assert seq.n_past == len(seq.tokens) == len(tokens) + 2 and seq.logits is not None
        with engine.opened(tokens + [token, token]) as alone:
            # The decode was kept: equal bits here (another CPU may round a batch differently, by far less than
            # 0.1), where the logits one token earlier are off by 15.
            np.testing.assert_allclose(seq.logits, alone.logits, atol=0.1)

        with pytest.raises(ContextOverflowError):
            engine.extend([(seq, [token] * engine.n_ctx_seq)], meanwhile=[lambda: ran.append(len(ran))])
        assert ran == [0, 1, 2] and seq.n_past == len(tokens) + 2


def test_a_programs_failing_work_is_its_own_in_a_shared_decode(engine: Engine):
    """Two programs' steps decoded together (the server's scheduler): the one whose work beside the decode fails
    gets that error at its yield; the other's decode and work go through."""
    from edge_adapt.engine.steps import Decode, decode_together

    tokens = _prompt(engine)
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("a bug in one program's step")

    with engine.opened(tokens) as a, engine.opened(tokens) as b:
        token = int(np.argmax(a.logits))
        errors = decode_together(engine, [Decode.of([(a, [token])], meanwhile=boom),
                                          Decode.of([(b, [token])], meanwhile=lambda: ran.append("b"))])
        assert isinstance(errors[0], RuntimeError) and errors[1] is None and ran == ["b"]
        assert a.n_past == b.n_past == len(tokens) + 1 and a.logits is not None and b.logits is not None  # both decoded


def test_log_probabilities_computed_beside_the_decode_are_the_ones_computed_in_line():
    """With a core left idle by the decode, the sampled tokens' log-probabilities are computed on a thread of
    their own meanwhile: same tokens, texts, log-probabilities and events, in the same order."""
    from edge_adapt.engine.device import physical_cores

    if physical_cores() < 2:
        pytest.skip("one core: llama.cpp's thread leaves none idle")
    with Engine(parallel=5, ctx=256, device="cpu", threads=1) as e:
        assert e._beside is not None
        tokens = _prompt(e)
        beside = list(e.generate(tokens, SAMPLED, n=4, max_tokens=24, top_logprobs=3))
        e._beside_workers = 3  # rows split in 3 ranges (as on a machine with more idle cores)
        split = list(e.generate(tokens, SAMPLED, n=4, max_tokens=24, top_logprobs=3))
        e._beside, pool = None, e._beside
        in_line = list(e.generate(tokens, SAMPLED, n=4, max_tokens=24, top_logprobs=3))
        e._beside = pool
    events = [ev for ev in beside if not isinstance(ev, Done)]  # Done carries the wall time
    assert events == [ev for ev in in_line if not isinstance(ev, Done)] and len(events) > 4 * 24 // 2
    assert events == [ev for ev in split if not isinstance(ev, Done)]


def test_a_snapshot_taken_right_after_a_fork_holds_the_forked_kv(engine: Engine):
    """With a KV stream per sequence llama.cpp copies a forked stream at the next decode, and a state read does
    not wait for it (this snapshot held an empty stream: logits off by 23). The engine decodes first."""
    root = engine.open(_prompt(engine))
    child = engine.fork(root)
    snap = engine.snapshot(child)  # nothing decoded since the fork
    back = engine.restore(snap)  # under a third id
    assert child.tokens == back.tokens == root.tokens and snap.n_past == root.n_past
    engine.extend([(back, [42]), (root, [42])])
    # Equal bits here: the same token on the same KV in one batch; a stale state is off by whole logits.
    np.testing.assert_allclose(back.logits, root.logits, atol=1e-3)
    for s in (root, child, back):
        engine.release(s)


def test_a_step_that_samples_in_place_while_a_worker_copies_gives_what_sampling_the_copy_gives(monkeypatch):
    """A step samples from llama.cpp's buffer in place while a worker copies the rows out (engine.outputs), with
    edits (ignore_eos, logit_bias) and the samples' rows in another order than the batch's (the last sample holds
    the prompt's id, the lowest): the same events as steps that wait for the copy first, and the same rows kept,
    the edited columns put back (a sample that ends on end-of-generation keeps the row it sampled that from)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from edge_adapt.engine.device import physical_cores
    from edge_adapt.engine.outputs import Outputs

    if physical_cores() < 2:
        pytest.skip("one core: llama.cpp's thread leaves none idle")
    monkeypatch.setattr("edge_adapt.engine.outputs._BESIDE_FROM_BYTES", 0)  # a worker copies the 3 rows too
    with Engine(parallel=4, ctx=256, device="cpu", threads=1) as e:
        assert e._beside is not None
        tokens = _prompt(e)
        eos = int(e.eog_tokens[0])
        params = [SamplingParams(temperature=0.0, logit_bias=((300, 4.0), (eos, 1.0)))] + [
            SamplingParams(temperature=0.9, seed=3 + i, ignore_eos=True, logit_bias=((eos, 3.0), (300, 6.0)))
            for i in range(2)]

        def run(params: list[SamplingParams] = params, consume_root: bool = True,
                ) -> tuple[list[object], list[np.ndarray], list[str | None]]:
            with e.opened(tokens) as root:
                samples = e.start(root, params, max_tokens=80, consume_root=consume_root, top_logprobs=2)
                events = list(e.advance(samples))
                return events, [s.seq.logits.copy() for s in samples], [s.finish for s in samples]

        in_place = InPlaceSteps(e)
        events, kept, finish = run()
        assert finish == ["eos", "length", "length"] and in_place.count > 40
        # Rows in the batch's order (the prompt's id not sampled from), one with a repetition penalty
        penalised = [*params[1:], SamplingParams(temperature=0.9, seed=8, repeat_penalty=1.3, ignore_eos=True)]
        before = in_place.count
        in_order = run(penalised, consume_root=False)
        assert in_place.count - before > 40
        # The copy in 4 pieces and the log-probabilities in 3 ranges of rows on 3 threads, the copy slowed down: the
        # log-probabilities are taken up before the copy of their rows is done, and wait for it.
        copy_rows = Outputs._copy_rows

        def slow_copy(self: Outputs, a: int, b: int) -> None:
            time.sleep(0.002)
            copy_rows(self, a, b)

        pool, e._beside, e._beside_workers = e._beside, ThreadPoolExecutor(3), 3
        monkeypatch.setattr(Outputs, "_copy_rows", slow_copy)
        try:
            split = run()
        finally:
            monkeypatch.setattr(Outputs, "_copy_rows", copy_rows)
            e._beside.shutdown()
            e._beside, e._beside_workers = pool, 1
        e._in_place = lambda live: None  # type: ignore[method-assign]  # every step waits for the copy
        copied, in_order_copied = run(), run(penalised, consume_root=False)
    for one, other in ((events, kept, finish), split), ((events, kept, finish), copied), (in_order, in_order_copied):
        assert other[0] == one[0] and other[2] == one[2]
        for row, row_other in zip(one[1], other[1]):  # the same decodes: equal bits; a row left edited is off by 4
            np.testing.assert_array_equal(row, row_other)


# -- misuse from a desktop app: an error, never a crash in llama.cpp or a corrupted neighbour --------------
def test_a_closed_engine_refuses_work_instead_of_crashing():
    e = Engine(parallel=2, ctx=256, device="cpu", threads=1)
    paused = e.generate("Hi", GREEDY, max_tokens=8)
    next(paused)
    e.close()
    e.close()  # twice is fine
    for use in (lambda: e.tokenize("Hi"), lambda: e.open([1, 2, 3]), lambda: list(e.generate([1, 2], max_tokens=2)),
                lambda: list(paused), lambda: e.resize(parallel=1)):
        with pytest.raises(EngineError, match="the engine is closed"):
            use()
    assert e.live_sequences == 0  # what the abandoned generation held is given back, without touching llama.cpp


def test_a_released_sequence_is_refused_so_the_one_now_on_its_id_stays_intact(engine: Engine):
    stale = engine.open([1, 2, 3])
    snap = engine.snapshot(stale)
    engine.release(stale)
    other = engine.open(engine.tokenize("The sky is"))  # takes the freed id
    assert other.id == stale.id
    before = np.array(other.logits, copy=True)
    for use in (lambda: engine.extend([(stale, [9])]), lambda: engine.fork(stale), lambda: engine.truncate(stale, 1),
                lambda: engine.snapshot(stale), lambda: engine.restore(snap, into=stale)):
        with pytest.raises(UsageError, match=f"sequence {stale.id} was released"):
            use()
    engine.extend([(other, [1])])
    fresh = engine.open(engine.tokenize("The sky is") + [1])
    assert np.allclose(other.logits, fresh.logits, atol=1e-4) and before.shape == fresh.logits.shape
    engine.release(other)
    engine.release(fresh)


def test_two_threads_decoding_on_one_engine_get_an_error_not_a_crash(engine: Engine):
    import threading

    errors: list[str] = []

    def work(seed: int) -> None:
        try:
            for _ in range(3):
                list(engine.generate("Write a poem about the sea.", SamplingParams(seed=seed), max_tokens=24, n=2))
        except EngineError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("another thread is decoding on this engine" in m for m in errors)
    assert engine.live_sequences == 0
    assert [type(ev).__name__ for ev in engine.generate("Hi", GREEDY, max_tokens=2)][-1] == "Done"


def test_a_second_thread_is_refused_while_a_generation_runs_and_the_first_goes_on_untouched(engine: Engine):
    """A generation paused at an event holds the engine for its thread: another thread's generate (even one
    asking for more sequences than are free) or busy() gets EngineError before it takes a sequence id. It used
    to take ids, move the first generation's sequences and decode between its steps: ids leaked for good and
    the first generation's texts changed."""
    import threading

    from edge_adapt.strategies import run_strategy

    prompt = _prompt(engine)
    alone = [e.text for e in engine.generate(prompt, SAMPLED, n=3, max_tokens=16) if isinstance(e, Finished)]
    first = engine.generate(prompt, SAMPLED, n=3, max_tokens=16)
    events = [next(first)]  # paused at its first event, holding its sequences
    held = engine.live_sequences
    errors: list[BaseException] = []

    def busy() -> None:
        with engine.busy():
            pass

    def second() -> None:
        calls = (lambda: next(engine.generate(prompt, SAMPLED, n=2, max_tokens=4)),
                 lambda: next(engine.generate(prompt, SAMPLED, n=engine.options.parallel, max_tokens=4)),
                 lambda: next(run_strategy(engine, prompt, {"strategy": "vote", "budget": 2, "max_tokens": 4})),
                 busy)
        for call in calls:
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - what the test looks at
                errors.append(exc)

    t = threading.Thread(target=second)
    t.start()
    t.join(60)
    assert [type(e) for e in errors] == [EngineError] * 4, errors
    assert all("another thread is decoding on this engine" in str(e) for e in errors)
    assert engine.live_sequences == held
    events += list(first)
    assert [e.text for e in events if isinstance(e, Finished)] == alone
    # Every id came back: the whole engine can be used at once.
    n = engine.options.parallel
    done = [e for e in engine.generate(prompt, GREEDY, n=n, max_tokens=2) if isinstance(e, Finished)]
    assert len(done) == n and engine.live_sequences == 0


def test_a_stream_left_paused_by_a_thread_that_ended_does_not_hold_the_engine_from_others(engine: Engine):
    """A worker thread that ends with its stream paused (an app that kept the iterator, not reading it) leaves
    no one to advance it: other threads may use the engine, as close() does not wait for such a stream."""
    import threading

    prompt = _prompt(engine)
    kept: list = []
    worker = threading.Thread(target=lambda: kept.append((g := engine.generate(prompt, SAMPLED, n=2, max_tokens=8),
                                                          next(g))))
    worker.start()
    worker.join(60)
    assert kept and engine.live_sequences > 0  # its sequences are still held: the stream lives
    # Python gives an ended thread's id to the next one: this one, or the engine's own workers. Was: the engine
    # took the live thread with the ended worker's id for the stream's, and refused every call from then on.
    blocker = threading.Event()
    others = []
    while len(others) < 20 and not any(t.ident == worker.ident for t in others):  # one with its id, most often
        others.append(threading.Thread(target=blocker.wait))
        others[-1].start()
    try:
        for _ in range(3):
            done = [e for e in engine.generate(prompt, GREEDY, n=2, max_tokens=2) if isinstance(e, Finished)]
            assert len(done) == 2
    finally:
        blocker.set()
        for t in others:
            t.join()
    kept[0][0].close()
    assert engine.live_sequences == 0


def test_work_one_thread_began_goes_on_on_another():
    """An app reading a stream through an executor advances it on whichever pool thread is free: a generation and
    a strategy run started on one thread go on on another (their rounds start there), and give their texts."""
    from concurrent.futures import ThreadPoolExecutor

    from edge_adapt.strategies import run_strategy

    with Engine(parallel=4, ctx=256, device="cpu") as e:
        prompt = _prompt(e)
        config = {"strategy": "vote", "budget": 2, "max_tokens": 8, "seed": 3}
        plain_alone = [x.text for x in e.generate(prompt, SAMPLED, n=2, max_tokens=8) if isinstance(x, Finished)]
        run_alone = [type(x).__name__ for x in run_strategy(e, prompt, config)]
        with ThreadPoolExecutor(1) as worker:
            plain = e.generate(prompt, SAMPLED, n=2, max_tokens=8)
            run = run_strategy(e, prompt, config)
            first_plain = worker.submit(next, plain).result()  # begun on the worker, which stays alive
            rest_plain = list(plain)
            first_run = worker.submit(next, run).result()
            rest_run = list(run)
        assert [x.text for x in [first_plain, *rest_plain] if isinstance(x, Finished)] == plain_alone
        assert [type(x).__name__ for x in [first_run, *rest_run]] == run_alone
        assert e.live_sequences == 0


def test_a_cancel_with_nothing_running_does_not_stop_the_next_request(engine: Engine):
    engine.cancel()  # the user pressed Stop just after a reply ended
    events = list(engine.generate("Name a fruit.", GREEDY, max_tokens=4))
    assert [e.reason for e in events if isinstance(e, Finished)] in (["length"], ["eos"])


def test_an_engine_or_vocab_dropped_without_close_frees_llama_cpps_memory():
    """An app that forgets close() lost ~300 MB of llama.cpp memory per dropped engine: collected Python objects,
    never-freed C handles."""
    import gc

    from edge_adapt.engine.vocab import Vocab

    for make in (lambda: Engine(parallel=2, ctx=256, device="cpu"), Vocab):
        owner = make()
        model = owner.model
        if isinstance(owner, Engine):
            list(owner.generate("Hi", GREEDY, max_tokens=2))
        del owner
        gc.collect()
        assert model.closed


def test_a_stream_started_on_a_worker_and_closed_elsewhere_does_not_block_close():
    """A worker thread (alive for the app's life) starts a stream and hands it to the UI thread, which drops it:
    the work was counted for the thread that ended it, the worker's entry stayed, and close() waited for a
    thread that ran nothing, then refused."""
    from concurrent.futures import ThreadPoolExecutor

    engine = Engine(parallel=2, ctx=256, device="cpu")
    with ThreadPoolExecutor(1) as worker:
        def start():  # type: ignore[no-untyped-def]
            it = engine.generate("Write a story.", GREEDY, n=2, max_tokens=64)
            for _ in range(4):
                next(it)
            return it

        worker.submit(start).result().close()
        engine.close(wait=2)  # the worker is alive and idle
        assert engine.model.closed


def test_bad_api_arguments_are_the_projects_errors(engine: Engine):
    """An app that catches EdgeAdaptError caught none of these: a TypeError, an AttributeError, llama.cpp's
    "could not create a context (out of memory?)"."""
    for bad in ("8", None, 0):
        with pytest.raises(UsageError, match="max_tokens must be a whole number >= 1"):
            list(engine.generate("Hi", GREEDY, max_tokens=bad))  # type: ignore[arg-type]
    for messages in ("hi", ["hi"], None):
        with pytest.raises(UsageError, match="chat messages must be a list|bad chat message"):
            engine.chat_prompt(messages)  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match="256 sequences take 257 sequence ids with split KV .* hold at most 255"):
        Engine(parallel=256, ctx=256, device="cpu")
    assert engine.live_sequences == 0


def test_a_cancel_ends_a_whole_strategy_run_not_only_its_round(engine: Engine):
    """A strategy run is one piece of work: Stop during its first round ends the run (Cancelled, every sequence
    given back); it used to end that round only, and the run went on to start the next."""
    from edge_adapt.engine.events import Cancelled, SampleStarted, Token
    from edge_adapt.strategies import run_strategy

    seen: list[object] = []
    with pytest.raises(Cancelled):
        for ev in run_strategy(engine, "Write a haiku about rain.",
                               {"strategy": "adaptive", "budget": 6, "threshold": 1.0, "max_tokens": 24}):
            seen.append(ev)
            if isinstance(ev, Token) and sum(isinstance(e, Token) for e in seen) == 1:
                engine.cancel()  # the user presses Stop
    after = seen[next(i for i, e in enumerate(seen) if isinstance(e, Token)):]
    assert not any(isinstance(e, SampleStarted) for e in after)
    assert engine.live_sequences == 0


def test_prompt_tokens_and_biased_tokens_outside_the_vocabulary_are_named(engine: Engine):
    n = engine.model.n_vocab
    for tokens in ([-1], [n], [1, 2, 2**40], [1.5, 2]):
        with pytest.raises(UsageError, match="is not a token id of this model's vocabulary"):
            list(engine.generate(tokens, GREEDY, max_tokens=2))
    with pytest.raises(UsageError, match=f"logit_bias names token {n}, outside the model's vocabulary of {n}"):
        list(engine.generate("Hi", SamplingParams(logit_bias=((n, 1.0),)), max_tokens=2))
    assert engine.live_sequences == 0


def test_bad_token_ids_given_to_extend_are_named_and_leave_every_sequence_as_it_was(engine: Engine, tmp_path):
    """Text was recorded as tokens (the sequence unusable for good), 1.9 decoded as 1 but recorded as 1.9 (a snapshot
    load_snapshot refused), an id past the vocabulary failed the decode unnamed, truncate took -1."""
    n = engine.model.n_vocab
    root, other = engine.open([1, 2, 3]), engine.open([4, 5])
    for bad, named in (([n], str(n)), ("ab", "'a'"), ([1.9], "1.9"), ([5, -1], "-1"), ([True], "True")):
        with pytest.raises(UsageError, match=f"^token {named} is not a token id of this model's vocabulary"):
            engine.extend([(other, [6]), (root, bad)])
        assert (root.tokens, root.n_past, other.tokens, other.n_past) == ([1, 2, 3], 3, [4, 5], 2)
    with pytest.raises(UsageError, match="truncate keeps n tokens, a whole number >= 0, got -1"):
        engine.truncate(root, -1)
    assert (root.tokens, root.n_past) == ([1, 2, 3], 3)
    engine.extend([(root, np.array([7, 8]))])  # numpy ids are recorded as the ints decoded: a snapshot takes them
    assert root.tokens == [1, 2, 3, 7, 8] and all(type(t) is int for t in root.tokens)
    save_snapshot(engine.snapshot(root), tmp_path / "s.snap")
    assert load_snapshot(tmp_path / "s.snap")[0].tokens == (1, 2, 3, 7, 8)
    engine.release(root)
    engine.release(other)
    opened = engine.open(np.array([1, 2, 3]))  # as generate takes a numpy prompt
    assert opened.tokens == [1, 2, 3]
    engine.release(opened)
    with pytest.raises(UsageError, match="prompt tokens must be given as a list of token ids"):
        engine.open(5)  # type: ignore[arg-type]


def test_the_wrong_object_given_for_a_sequence_a_snapshot_or_an_engine_is_named(engine: Engine, tmp_path):
    """Each was an AttributeError; restore("chat.snap") is a natural slip, as the file API takes a path."""
    from edge_adapt.session import ChatSession

    root = engine.open([1, 2, 3])
    save_snapshot(engine.snapshot(root), tmp_path / "s.snap")
    for call, message in [
        (lambda: engine.restore(None), "restore takes a Snapshot \\(load_snapshot\\(path\\) reads a file\\), got NoneType"),
        (lambda: engine.restore(str(tmp_path / "s.snap")), "restore takes a Snapshot .*, got str"),
        (lambda: engine.snapshot("x"), "expected a Sequence .*, got str"),
        (lambda: engine.fork(None), "expected a Sequence .*, got NoneType"),
        (lambda: engine.release("x"), "expected a Sequence .*, got str"),
        (lambda: engine.truncate("x", 1), "expected a Sequence .*, got str"),
        (lambda: save_snapshot(root, tmp_path / "t.snap"), "save_snapshot takes a Snapshot .*, got Sequence"),
        (lambda: ChatSession(None), "ChatSession takes an Engine, got NoneType"),
    ]:
        with pytest.raises(UsageError, match=message):
            call()  # type: ignore[arg-type]
    engine.release(root)


def test_save_snapshot_names_its_own_force_argument_not_the_clis_flag(engine: Engine, tmp_path):
    root = engine.open([1, 2, 3])
    snap = engine.snapshot(root)
    engine.release(root)
    path = tmp_path / "s.snap"
    save_snapshot(snap, path, extra={"n": 1})
    with pytest.raises(UsageError, match=f"^{path} already exists; save_snapshot\\(\\.\\.\\., force=True\\) overwrites it$"):
        save_snapshot(snap, path, extra={"n": 2})
    assert load_snapshot(path)[1] == {"n": 1}
    save_snapshot(snap, path, extra={"n": 2}, force=True)
    assert load_snapshot(path)[1] == {"n": 2}


def test_detokenize_refuses_what_is_not_a_token_id_instead_of_aborting_the_process(engine: Engine):
    """An id past the vocabulary (a stored or remote id) ended the process in llama.cpp (std::out_of_range), and a
    float or a string gave a ctypes traceback."""
    n = engine.model.n_vocab
    for bad in ([n], [1, 10**9], [-1], [1.5], [None]):
        with pytest.raises(UsageError, match="is not a token id of this model's vocabulary"):
            engine.detokenize(bad)
    for bad in ("abc", b"ab", 5):
        with pytest.raises(UsageError, match="detokenize takes a list of token ids"):
            engine.detokenize(bad)  # type: ignore[arg-type]
    tokens = engine.tokenize("The sky is blue.")
    assert engine.detokenize(tokens) == engine.detokenize(tuple(tokens)) == engine.detokenize(np.array(tokens))
    assert engine.detokenize(tokens) == "The sky is blue."


def test_a_numpy_seed_is_taken_as_the_number_it_is(engine: Engine):
    """Sample i uses seed + i: in numpy's int64 the largest seed wrapped around to a negative one the caller never
    gave, and was refused."""
    big = 2**63 - 1
    runs = [[(type(e).__name__, getattr(e, "seed", None), getattr(e, "text", None))
             for e in engine.generate("Hi", SamplingParams(seed=seed), n=2, max_tokens=4)][:-1]  # all but Done
            for seed in (big, np.int64(big))]
    assert runs[0] == runs[1]
    assert [seed for name, seed, _ in runs[1] if name == "SampleStarted"] == [big, big + 1]


def test_the_largest_logit_bias_keeps_log_probabilities_finite_and_a_larger_one_is_refused(engine: Engine):
    """A bias of 1e39 (finite in float64) overflowed the float32 logits: every reported log-probability was NaN."""
    from edge_adapt.engine import Token

    token = engine.tokenize(" blue")[0]
    # The strongest scalings of a biased logit: a low temperature, and the lowest repetition penalty on it.
    params = SamplingParams(temperature=1e-6, repeat_penalty=0.01, logit_bias=((token, 1e6),))
    events = list(engine.generate("The sky is", params, max_tokens=3))
    steps = [e for e in events if isinstance(e, Token)]
    assert [e.token for e in steps] == [token] * 3 and all(np.isfinite(e.logprob) for e in steps)
    with pytest.raises(UsageError, match="logit_bias for token 5 must be between -1,000,000 and 1,000,000"):
        SamplingParams(logit_bias=((5, 1e39),))


def test_generate_takes_one_stop_string_whole_and_refuses_empty_requests(engine: Engine):
    prompt = engine.tokenize("The numbers from one to ten are one, two, three")
    free = [e.text for e in engine.generate(prompt, GREEDY, max_tokens=24) if isinstance(e, Finished)][0]
    # A stop string one of whose characters comes earlier in the reply: read as characters, it would cut there.
    word = next(free[i : i + 4] for i in range(len(free) - 4)
                if min(free.find(c) for c in free[i : i + 4]) < free.index(free[i : i + 4]))
    # A string is one stop string (as in OpenAI's API), not a set of characters each ending the reply.
    (done,) = [e for e in engine.generate(prompt, GREEDY, max_tokens=24, stop=word) if isinstance(e, Finished)]
    assert (done.reason, done.text) == ("stop", free[: free.index(word)]), (free, word)
    for bad, message in ((dict(n=0), "n must be a whole number >= 1"), (dict(params=[]), "give one SamplingParams per sample"),
                         (dict(top_logprobs=-1), "top_logprobs must be between 0"), (dict(stop=[""]), "non-empty")):
        with pytest.raises(UsageError, match=message):
            list(engine.generate(prompt, **{"params": GREEDY, "max_tokens": 4, **bad}))
    assert engine.live_sequences == 0


def test_resize_refuses_a_kept_sequence_listed_twice_or_released():
    with Engine(parallel=3, ctx=256) as e:
        seq = e.open(e.tokenize("The sky is"))
        gone = e.open([1, 2, 3])
        e.release(gone)
        with pytest.raises(UsageError, match="listed twice"):
            e.resize(parallel=2, keep=[seq, seq])
        with pytest.raises(UsageError, match="was released"):
            e.resize(parallel=2, keep=[seq, gone])
        assert (e.options.parallel, e.live_sequences, seq.n_past) == (3, 1, 3)
        e.extend([(seq, [1])])  # the kept sequence is whole: its KV still continues
        e.release(seq)


def test_closing_from_another_thread_cancels_its_generation_and_waits_for_it():
    """An app quitting while a worker thread reads a reply: freeing the context under the worker's decode (or under
    its step reading logits in place) crashed the process."""
    import threading

    from edge_adapt.engine import Token

    e = Engine(parallel=3, ctx=512)
    started, go_on, reasons, errors = threading.Event(), threading.Event(), [], []

    def worker() -> None:
        try:
            for ev in e.generate("Write a long story.", SamplingParams(seed=1, ignore_eos=True), n=2, max_tokens=400):
                if isinstance(ev, Token) and not started.is_set():
                    started.set()
                    go_on.wait(30)  # paused mid-stream: the first close cannot wait this long
                if isinstance(ev, Finished):
                    reasons.append(ev.reason)
        except EngineError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(60)
    with pytest.raises(EngineError, match="has not ended within 0.3 s"):
        e.close(wait=0.3)
    assert not e.model.closed  # still open, and the worker goes on reading (cancelled)
    go_on.set()
    e.close()
    assert reasons == ["cancelled", "cancelled"] and errors == []  # it waited for the worker's stream to end
    t.join(30)
    assert not t.is_alive() and e.live_sequences == 0
    with pytest.raises(EngineError, match="the engine is closed"):
        e.tokenize("Hi")


def test_the_python_api_names_a_wrong_type_instead_of_failing_deep_inside_or_guessing(engine: Engine):
    """What a desktop app's bug passes: each a one-line UsageError (or BudgetError) at once, nothing held after."""
    from edge_adapt.errors import BudgetError

    cases = [
        (lambda: next(engine.generate("Hi", GREEDY, n=10**9)), BudgetError, "1000000000 samples need"),  # no 10^9 params
        (lambda: next(engine.generate("Hi", GREEDY, max_tokens=4.7)), UsageError, "max_tokens must be a whole number"),
        (lambda: next(engine.generate("Hi", GREEDY, n=2.0)), UsageError, "n must be a whole number"),
        (lambda: next(engine.generate("Hi", None)), UsageError, "params must be a SamplingParams"),
        (lambda: next(engine.generate("Hi", GREEDY, max_tokens=4, stop=5)), UsageError, "stop is a string or a list"),
        (lambda: next(engine.generate(b"Hi", GREEDY)), UsageError, "got bytes"),  # not read as token ids 72, 105
        (lambda: next(engine.generate("caf\udce9", GREEDY)), UsageError, "not valid Unicode"),
        (lambda: SamplingParams(seed=1.5), UsageError, "seed .* must be a whole number"),
        (lambda: SamplingParams(temperature=None), UsageError, "temperature .* must be a number"),
        (lambda: Engine(threads=1.5), UsageError, "engine options: threads"),
        (lambda: Engine({"ctx": 64}), UsageError, "Engine options are an EngineOptions or keywords"),  # not a dict
        (lambda: engine.chat_tokens([{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "ab\udc80"}]),
         UsageError, r"message 2 is not valid Unicode \('\\udc80' at character 2\)"),  # where it is in that message
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    done = [e for e in engine.generate("Hi", GREEDY, max_tokens=3, stop=None) if isinstance(e, Finished)]
    assert len(done) == 1 and engine.live_sequences == 0  # stop=None: no stop strings


def test_context_overflow_names_the_fix_that_works(engine: Engine) -> None:
    """Was: a 1-token prompt with max_tokens 300 said "raise --ctx or shorten the prompt"; a prompt that alone
    filled the context said "lower max_tokens", and so did chat of a system message that did."""
    from edge_adapt.session import ChatSession
    from edge_adapt.strategies import StrategyConfig, run_strategy

    with pytest.raises(ContextOverflowError, match=r"max_tokens \(300\) = 30\d tokens exceed the context of 256 "
                                                   r"per sequence \(lower max_tokens or raise --ctx\)"):
        list(engine.generate("hi", max_tokens=300))
    long = "rule " * 300
    with pytest.raises(ContextOverflowError, match=r"\(shorten the prompt or raise --ctx\)"):
        list(engine.generate(long, max_tokens=8))
    with pytest.raises(ContextOverflowError, match=r"^the prompt alone \(\d+ tokens\) fills the context of 256 per "
                                                   r"sequence \(raise --ctx or shorten the prompt\)$"):
        run_strategy(engine, long, StrategyConfig(strategy="best-of-n", budget=2, max_tokens=8))
    with pytest.raises(BudgetError, match=r"\(start the chat with a larger --ctx or a shorter --system\)$"):
        ChatSession(engine, system=long, max_tokens=8)
    assert engine.live_sequences == 0


def test_a_stop_string_that_is_not_valid_unicode_is_refused(engine: Engine):
    """A lone surrogate (bytes that were not UTF-8) can never be generated: such a stop string did nothing."""
    with pytest.raises(UsageError, match="stop string 'a\\\\udcffb' is not valid Unicode"):
        next(engine.generate("Hi", GREEDY, max_tokens=2, stop="a\udcffb"))


def test_resize_refuses_a_bad_size_in_one_line(engine: Engine):
    """Was: pydantic's multi-line ValidationError, which an app's `except EdgeAdaptError` does not catch."""
    for kw in ({"parallel": 0}, {"ctx": 10}, {"parallel": True}):
        (name,) = kw
        with pytest.raises(UsageError, match=rf"^resize: {name}: [^\n]+$"):
            engine.resize(**kw)
    assert (engine.options.parallel, engine.options.ctx) == (9, 256)


def test_engine_options_refuse_a_bool_as_a_count_and_take_numpy_ints():
    """Was: Engine(parallel=True) loaded an engine of one sequence, and ctx=True was called too small."""
    from edge_adapt.engine import EngineOptions

    for name in ("ctx", "parallel", "threads", "gpu_layers", "batch"):
        with pytest.raises(UsageError, match=rf"^engine options: {name}: must be a whole number, got True$"):
            Engine(**{name: True})
    opts = EngineOptions(parallel=np.int64(3), ctx=np.int32(512))
    assert (opts.parallel, opts.ctx) == (3, 512)


def test_a_sample_a_stop_string_ends_keeps_only_the_tokens_of_its_text(engine: Engine):
    """Was: a stop string's tokens stayed in the sample's sequence, and its self-evaluation, decoded after them,
    judged text the caller never saw (a reply shown as "" was scored as the "1" the stop string had cut)."""
    from edge_adapt.selfeval import SelfEvaluator

    tokens = _prompt(engine)
    greedy = _tokens_alone(engine, tokens, GREEDY, 8)
    shown = engine.model.piece(greedy[0]) + engine.model.piece(greedy[1])
    stop = engine.model.piece(greedy[2]).decode()[:2]  # begins at the start of the third token
    scorer = SelfEvaluator(engine)

    def score(max_tokens: int, stop: tuple[str, ...] = ()) -> tuple[float, list[int], int]:
        root = engine.open(tokens)
        (s,) = engine.start(root, [GREEDY], max_tokens=max_tokens, stop=stop, consume_root=True)
        list(engine.advance([s]))
        try:
            return scorer.score([s])[0], s.seq.tokens[len(tokens):], s.dropped
        finally:
            engine.release(s.seq)

    p_stopped, held, dropped = score(8, (stop,))
    assert engine.model.piece(held[0]) + engine.model.piece(held[1]) == shown and held == greedy[:2]
    assert dropped == 1  # generated 3 tokens, the third began the stop string
    p_cut, _, _ = score(2)  # the same two tokens, no stop string
    # Both sequences hold KV made by the same decodes of the same tokens at the same positions, and the suffix is
    # decoded alone in each: the same kernels on any CPU, so only float noise could part them.
    assert p_stopped == pytest.approx(p_cut, abs=1e-5)
