"""Self-evaluation on the embedded model: scoring is exact, cheap and leaves generation alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edge_adapt.engine import GREEDY, Engine, SamplingParams
from edge_adapt.errors import EngineError, ModelFileError, UsageError
from edge_adapt.selfeval import SelfEvalConfig, SelfEvaluator, p_keep
from edge_adapt.strategies import Chosen, StrategyConfig, run_strategy
from lora_files import make_lora  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.slow  # the embedded model, both KV layouts: about a minute on 2 shared cores

PROMPT = [{"role": "user", "content": "Name three colours and explain which one you like best."}]
PARAMS = [GREEDY, SamplingParams(temperature=0.9, seed=3), SamplingParams(temperature=1.2, seed=11)]


@pytest.fixture(scope="module", params=[False, True], ids=["split-kv", "unified-kv"])
def engine(request):
    # One thread: on a shared 2-core machine two llama.cpp threads spin-wait on each other and run slower.
    with Engine(parallel=8, ctx=512, threads=1, kv_unified=request.param) as e:
        yield e


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora") / "lora.gguf")


def generate(e: Engine, scorer: SelfEvaluator | None, score_at: tuple[int, ...] = (), until: int = 40):
    """Tokens and log-probabilities of PARAMS' samples, optionally scored at some token counts."""
    root = e.open(e.tokenize(e.chat_prompt(PROMPT)))
    samples = e.start(root, PARAMS, max_tokens=until)
    try:
        for point in score_at:
            list(e.advance(samples, until=point))
            assert scorer is not None
            scorer.score(samples)
        list(e.advance(samples))
        return [(list(s.generated), list(s.logprobs)) for s in samples]
    finally:
        for s in samples:
            e.release(s.seq)
        e.release(root)


UNTRAINED = SelfEvalConfig(default_adapter=False)  # the model's own answer, without the shipped adapter


def test_default_model_scores_with_the_shipped_adapter_and_its_suffix(engine):
    from edge_adapt.engine.default_model import default_selfeval_adapter

    shipped = default_selfeval_adapter()
    assert shipped is not None, "models/smollm2-135m-selfeval.gguf is not installed with the package"
    ev = SelfEvaluator(engine)
    assert ev.config.adapter == shipped and ev.config.format == "raw"
    assert ev.suffix == engine.tokenize("<|im_end|>Restart") and len(ev.suffix) == 3
    assert ev.adapter is not None and ev.adapter.invocation_tokens == ev.suffix and ev.base_part == []
    assert engine.detokenize([ev.yes_token]) == " Yes" and engine.detokenize([ev.no_token]) == " No"


def test_untrained_suffix_is_chatml_question_turn(engine):
    ev = SelfEvaluator(engine, UNTRAINED)
    assert ev.suffix == engine.tokenize(
        '<|im_end|>\n<|im_start|>user\nWould you do better if you started over? ("Yes." or "No.")<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert len(ev.suffix) == 27 and ev.suffix[0] == engine.tokenize("<|im_end|>")[0]
    assert engine.detokenize([ev.yes_token]) == "Yes" and engine.detokenize([ev.no_token]) == "No"


def test_multi_token_answer_rejected(engine):
    with pytest.raises(UsageError, match=r"yes='Yes\.' is 2 tokens"):
        SelfEvaluator(engine, SelfEvalConfig(yes="Yes."))


def test_scoring_does_not_change_continuation(engine):
    plain = generate(engine, None)
    scored = generate(engine, SelfEvaluator(engine), score_at=(8, 24))
    assert [t for t, _ in scored] == [t for t, _ in plain]
    for (_, a), (_, b) in zip(scored, plain):
        assert a == pytest.approx(b, abs=1e-5)


def test_scratch_score_equals_decoding_everything_from_scratch(engine):
    """Scoring through a scratch extension equals decoding prompt + response + suffix into a new sequence.

    Bit for bit when the KV was computed the same way: the response replayed one token per step into a
    fresh sequence, scored through the scratch vs. extended with the suffix directly; and the batched
    samples' own scores equal the replay's with split KV. llama.cpp rounds differently when several
    sequences share one decode in a unified KV, or when the response is decoded as one many-token batch,
    so those comparisons get a tolerance (seen up to 0.06 on this Q4_1 model; the gap is the kernels', not the fork's: one sample alone
    matches exactly). Without an adapter, so that "decoding everything" needs no adapter switching."""
    ev = SelfEvaluator(engine, UNTRAINED)
    prompt = engine.tokenize(engine.chat_prompt(PROMPT))
    root = engine.open(prompt)
    samples = engine.start(root, PARAMS, max_tokens=48)
    list(engine.advance(samples, until=20))  # partial responses; one may have finished
    scores = ev.score(samples)
    tol = 0.05 if engine.options.kv_unified else 1e-6
    for s, got in zip(samples, scores):
        replay = engine.open(prompt)
        for t in s.seq.tokens[len(prompt) :]:
            engine.extend([(replay, [t])])
        via_scratch = ev.score([replay])[0]
        engine.extend([(replay, ev.suffix)])
        direct = p_keep(replay.logits, ev.yes_token, ev.no_token)[0]
        engine.release(replay)
        assert via_scratch == pytest.approx(direct, abs=1e-6)
        assert got == pytest.approx(direct, abs=tol)
        one_batch = engine.open(s.seq.tokens + ev.suffix)
        assert got == pytest.approx(p_keep(one_batch.logits, ev.yes_token, ev.no_token)[0], abs=0.1)
        engine.release(one_batch)
    for s in samples:
        engine.release(s.seq)
    engine.release(root)


def test_scoring_decodes_only_the_suffix_once(engine):
    ev = SelfEvaluator(engine)
    root = engine.open(engine.tokenize(engine.chat_prompt(PROMPT)))
    samples = engine.start(root, PARAMS, max_tokens=16)
    list(engine.advance(samples))
    tokens_before, calls_before = engine.decoded_tokens, engine.decode_calls
    kv_before = [(list(s.seq.tokens), s.seq.n_past, s.seq.logits.copy()) for s in samples]
    ev.score(samples)
    assert engine.decoded_tokens - tokens_before == len(samples) * len(ev.suffix) == ev.decoded_tokens
    assert engine.decode_calls - calls_before == 1  # one batched decode for all samples
    for s, (toks, n_past, logits) in zip(samples, kv_before):
        assert s.seq.tokens == toks and s.seq.n_past == n_past and np.array_equal(s.seq.logits, logits)
    for s in samples:
        engine.release(s.seq)
    engine.release(root)


def test_adapter_is_on_only_while_scoring(engine, lora):
    base = generate(engine, None)
    with_adapter = SelfEvaluator(engine, adapter_path=lora)
    scored = generate(engine, with_adapter, score_at=(8, 24))
    assert [t for t, _ in scored] == [t for t, _ in base]  # generation stays the base model's
    root = engine.open(engine.tokenize(engine.chat_prompt(PROMPT)))
    samples = engine.start(root, PARAMS[:1], max_tokens=16)
    list(engine.advance(samples))
    on, off = with_adapter.score(samples)[0], SelfEvaluator(engine, UNTRAINED).score(samples)[0]
    assert abs(on - off) > 1e-4  # ...and the adapter did change the score
    engine.release(samples[0].seq)
    engine.release(root)


def test_alora_is_switched_on_at_its_invocation_tokens(engine, tmp_path):
    invocation = engine.tokenize("<|im_start|>user")
    path = make_lora(tmp_path / "alora.gguf", seed=1, invocation=invocation)
    ev = SelfEvaluator(engine, adapter_path=path)
    assert ev.adapter.invocation_tokens == invocation
    assert ev.adapter_part[: len(invocation)] == invocation and ev.base_part + ev.adapter_part == ev.suffix
    assert len(ev.base_part) == 2  # <|im_end|> \n: decoded with the adapter off
    root = engine.open(engine.tokenize(engine.chat_prompt(PROMPT)))
    samples = engine.start(root, PARAMS[:2], max_tokens=12)
    list(engine.advance(samples))
    got = ev.score(samples)

    def by_hand(adapter_from: int) -> np.ndarray:
        with engine.scratch([s.seq for s in samples]) as tmp:
            engine.extend([(t, ev.suffix[:adapter_from]) for t in tmp])
            with engine.adapter(ev.adapter):
                engine.extend([(t, ev.suffix[adapter_from:]) for t in tmp])
            return p_keep(np.stack([t.logits for t in tmp]), ev.yes_token, ev.no_token)

    assert got == pytest.approx(by_hand(len(ev.base_part)).tolist(), abs=1e-6)
    assert np.abs(by_hand(0) - np.array(got)).max() > 1e-4  # adapter on for the whole suffix is another score
    for s in samples:
        engine.release(s.seq)
    engine.release(root)


def test_adapter_gguf_carries_the_self_eval_config(engine, tmp_path):
    path = make_lora(tmp_path / "meta.gguf", meta={"self_eval.question": "Is this answer correct?"})
    ev = SelfEvaluator(engine, adapter_path=path)
    assert ev.config.question == "Is this answer correct?" and ev.config.adapter == path
    assert "Is this answer correct?" in engine.detokenize(ev.suffix)
    assert SelfEvaluator(engine, SelfEvalConfig(adapter=path)).config.question == "Is this answer correct?"
    explicit = SelfEvaluator(engine, SelfEvalConfig(question="Sure?"), adapter_path=path)
    assert explicit.config.question == "Sure?"  # what the caller sets wins over the file's keys


def test_a_score_that_is_not_a_number_is_refused_not_chosen_by(engine, tmp_path):
    """Was: an adapter whose alpha or scale made the suffix's logits overflow scored every sample NaN, and
    best-of-n chose one of them (at random), printing `"p_keep": NaN`, which no JSON parser reads."""
    with pytest.raises(ModelFileError, match="adapter.lora.alpha is nan, not a finite number"):
        SelfEvaluator(engine, adapter_path=make_lora(tmp_path / "nan.gguf", alpha=float("nan")))
    with pytest.raises(ValidationError, match="finite number"):
        SelfEvalConfig(adapter_scale=float("inf"))
    ev = SelfEvaluator(engine, adapter_path=make_lora(tmp_path / "huge.gguf", meta={"self_eval.adapter_scale": "1e30"}))
    root = engine.open(engine.tokenize(engine.chat_prompt(PROMPT)))
    try:
        with pytest.raises(EngineError, match="a score that is not a number .*scale 1e\\+30"):
            ev.score([root])
    finally:
        engine.release(root)
    assert engine.live_sequences == 0  # the scratch extensions went back too


# Adapters llama.cpp refuses for this model; each is refused by name before llama.cpp is asked (the server
# checks before it announces "listening"), and llama.cpp's own verdict is checked to be the same.
WRONG_ADAPTERS = {
    "wider model": (dict(n_embd=960, n_embd_kv=320), "does not fit"),
    "more blocks": (dict(n_blocks=32), "'blk.30.attn_q.weight', which"),
    "narrower k/v": (dict(n_embd_kv=128), "does not fit"),
}


@pytest.mark.parametrize("case", WRONG_ADAPTERS)
def test_adapter_for_another_model_is_refused_by_name(engine, tmp_path, case):
    from edge_adapt.engine.handles import Adapter
    from edge_adapt.errors import ModelFileError

    sizes, message = WRONG_ADAPTERS[case]
    path = make_lora(tmp_path / "wrong.gguf", **sizes)
    with pytest.raises(ModelFileError, match="could not load this adapter"):
        Adapter(engine.model, path)  # what the check stands in front of
    for load in (lambda: SelfEvaluator(engine, adapter_path=path), lambda: engine.load_adapter(path)):
        with pytest.raises(ModelFileError, match=message) as refused:
            load()
        assert "another model" in str(refused.value)


def test_adapter_of_another_architecture_is_refused_by_name(engine, tmp_path):
    import gguf

    from edge_adapt.errors import ModelFileError

    path = make_lora(tmp_path / "lora.gguf")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"llama")  # general.architecture, the first string value the writer puts in the file
    raw[at : at + 5] = b"qwen2"
    path.write_bytes(bytes(raw))
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "qwen2"
    with pytest.raises(ModelFileError, match="'qwen2' architecture, .* is 'llama'"):
        SelfEvaluator(engine, adapter_path=path)


def test_an_adapter_holding_nan_is_refused_before_it_scores(engine, tmp_path):
    """A training run that diverged exported an adapter whose every score was NaN: `run --show-scores` printed
    "@10: nan" for each sample and best-of-n chose sample 0 without a word."""
    import gguf

    from edge_adapt.errors import ModelFileError

    path = make_lora(tmp_path / "nan.gguf")
    reader = gguf.GGUFReader(path, "r+")
    reader.tensors[5].data[0, 0] = np.nan
    del reader
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        SelfEvaluator(engine, adapter_path=path)


@pytest.mark.parametrize("strategy", ["adaptive", "beam"])
def test_a_cancel_ends_the_whole_strategy_run(engine, strategy):
    """engine.cancel() in the middle of a run ends the run, not only the step it lands in: adaptive went on to
    start 15 more samples and generate 333 more tokens after a cancel at its first token."""
    import threading

    from edge_adapt.engine import Token
    from edge_adapt.engine.events import Cancelled, SampleStarted

    free = engine.free_sequences
    own = {"budget": 6, "threshold": 1.0} if strategy == "adaptive" else {"budget": 4, "beam_width": 2}
    cfg = StrategyConfig(strategy=strategy, max_tokens=24, **own)
    seen: list[object] = []
    with pytest.raises(Cancelled):
        for ev in run_strategy(engine, "Write a haiku about rain.", cfg):
            seen.append(ev)
            if isinstance(ev, Token) and sum(isinstance(x, Token) for x in seen) == 1:
                canceller = threading.Thread(target=engine.cancel)
                canceller.start()
                canceller.join()
    first = next(i for i, ev in enumerate(seen) if isinstance(ev, Token))
    assert not any(isinstance(ev, SampleStarted) for ev in seen[first:])  # nothing new was started
    assert sum(isinstance(ev, Token) for ev in seen) <= cfg.budget  # at most the step in flight
    assert engine.free_sequences == free
    # The cancel was for that run only: the next one runs to its end.
    events = list(run_strategy(engine, "What is 2 + 2?", StrategyConfig(strategy="best-of-n", budget=2, max_tokens=8)))
    assert isinstance(events[-2], Chosen)


@pytest.mark.parametrize("strategy, own", [("best-of-n", {}), ("prune", {"k": 2, "prune_at": (6,)}),
                                           ("adaptive", {"threshold": 1.0})])
def test_strategies_run_on_the_model(engine, strategy, own):
    free = engine.free_sequences
    cfg = StrategyConfig(strategy=strategy, budget=4, max_tokens=16, **own)
    events = list(run_strategy(engine, "What is 2 + 2?", cfg))
    usage = events[-1].usage
    assert isinstance(events[-2], Chosen)
    assert usage.selfeval_tokens > 0 and usage.selfeval_tokens % 3 == 0  # the shipped adapter's 3-token suffix
    assert engine.free_sequences == free


# A stop string beginning with every letter, space and stop, each completed by a character no reply holds: a
# step's last character is held back as the possible start of one of them.
HOLD_BACK = [c + "\x01" for c in "abcdefghijklmnopqrstuvwxyz ,."]


@pytest.mark.parametrize("strategy", ["prune", "beam"])
def test_a_samples_token_texts_then_its_tail_are_its_text(engine, strategy):
    """A sample ended from outside its decode (pruned, out of search rounds) releases the text it held back as
    the possible start of a stop string in Finished.tail: no Token carried it, and a client streaming a sample's
    text would otherwise miss its last characters."""
    from edge_adapt.engine import Finished, Token

    own = ({"k": 1, "prune_at": (6,)} if strategy == "prune"
           else {"beam_width": 2, "max_rounds": 2, "max_step_tokens": 4})
    cfg = StrategyConfig(strategy=strategy, budget=4, max_tokens=24, stop=HOLD_BACK, temperature=0.9, **own)
    streamed: dict[int, str] = {}
    ended = []
    for ev in run_strategy(engine, "Name three colours.", cfg):
        if isinstance(ev, Token):
            streamed[ev.sample] = streamed.get(ev.sample, "") + ev.text
        elif isinstance(ev, Finished):
            ended.append(ev)
            own = streamed.get(ev.sample, "") + ev.tail
            # A beam's sample goes on from its parent's text, which was streamed under the parent's index.
            assert ev.text == own if strategy == "prune" else ev.text.endswith(own)
    outside = [f for f in ended if f.reason == ("pruned" if strategy == "prune" else "length")]
    assert outside and any(f.tail for f in outside)


def test_a_cancelled_samples_token_texts_then_its_tail_are_its_text(engine):
    import threading

    from edge_adapt.engine import Finished, Token

    streamed: dict[int, str] = {}
    ended = []
    cancelled: list[threading.Thread] = []
    for ev in engine.generate(engine.chat_prompt(PROMPT), SamplingParams(temperature=0.9, seed=5), n=3,
                              max_tokens=24, stop=HOLD_BACK):
        if isinstance(ev, Token):
            streamed[ev.sample] = streamed.get(ev.sample, "") + ev.text
            if len(streamed[ev.sample]) > 8 and not ended and not cancelled:
                cancelled.append(threading.Thread(target=engine.cancel))
                cancelled[0].start()
                cancelled[0].join()
        elif isinstance(ev, Finished):
            ended.append(ev)
            assert streamed.get(ev.sample, "") + ev.tail == ev.text
    assert {f.reason for f in ended} == {"cancelled"} and any(f.tail for f in ended)
