"""The sample pool on the real embedded model: recorded fields, caching, resume after a kill, stale keys."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edge_adapt.engine import Engine
from edge_adapt.eval.pool import PoolCache, PoolSettings, build_pool, model_identity
from edge_adapt.tasks import arith_suite

from test_eval_standin import StandInSelfEval  # tests/ is on sys.path under pytest (rootdir-less layout)

SETTINGS = PoolSettings(k=3, temperature=0.8, max_tokens=10, prune_points=(4,), seed=0)


@pytest.fixture(scope="module")
def engine():
    with Engine(parallel=SETTINGS.k + 2, ctx=256) as e:
        yield e


@pytest.fixture(scope="module")
def scorer(engine):
    return StandInSelfEval(engine)


def _drain(it):
    return list(it)


def test_pool_records_every_sample_field(engine, scorer, tmp_path):
    suite = arith_suite("test", 2)
    steps = _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path))
    assert [s.generated for s in steps] == [True, True]
    pool = steps[0].pool
    assert len(pool.samples) == 3 and pool.greedy.index == -1 and pool.greedy.temperature == 0
    assert len({s.seed for s in pool.samples}) == 3 and {s.temperature for s in pool.samples} == {0.8}
    for s in (*pool.samples, pool.greedy):
        assert 1 <= s.n_tokens <= 10 and len(s.logprobs) == s.n_tokens and all(lp <= 0 for lp in s.logprobs)
        assert 0 <= s.end_score <= 1 and len(s.scores) == 1 and len(s.selfeval_tokens) == 2
        assert (s.scores[0] is None) == (s.n_tokens <= 4 and s.finish in ("eos", "stop"))
        assert s.selfeval_tokens[-1] > 0 and s.correct == suite.scorer.correct(s.text, pool.answer)
    assert engine.free_sequences == SETTINGS.k + 2  # every id given back


def test_pool_samples_are_reproducible(engine, scorer, tmp_path):
    suite = arith_suite("test", 1)
    a = _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path / "a"))[0].pool
    b = _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path / "b"))[0].pool
    assert [s.text for s in a.samples] == [s.text for s in b.samples]
    assert [s.end_score for s in a.samples] == pytest.approx([s.end_score for s in b.samples], abs=1e-4)


def test_kill_midway_then_resume_regenerates_nothing_and_loses_nothing(engine, scorer, tmp_path):
    suite = arith_suite("test", 4)
    first = []
    for step in build_pool(engine, scorer, suite, SETTINGS, tmp_path):
        first.append(step.pool)
        if len(first) == 2:
            break  # the process dies here...
    (path,) = tmp_path.glob("pool-*.jsonl")
    with path.open("a") as fh:
        fh.write('{"key": "torn line of the prompt in fli')  # ...in the middle of writing the third prompt
    decoded = engine.decoded_tokens
    steps = _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path))
    assert [s.generated for s in steps] == [False, False, True, True]
    assert [s.pool for s in steps[:2]] == first  # nothing lost, nothing regenerated
    assert engine.decoded_tokens > decoded
    decoded = engine.decoded_tokens
    again = _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path))
    assert not any(s.generated for s in again) and engine.decoded_tokens == decoded
    assert [s.pool for s in again] == [s.pool for s in steps]
    assert len(PoolCache(path).load()) == 4
    lines = path.read_text().splitlines()
    assert sum(1 for ln in lines if ln.startswith('{"key"') and ln.endswith("}")) == 4


def test_a_changed_setting_never_reuses_stale_samples(engine, scorer, tmp_path):
    suite = arith_suite("test", 1)
    _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path))
    for changed in (replace(SETTINGS, max_tokens=11), replace(SETTINGS, temperature=0.9),
                    replace(SETTINGS, prune_points=(5,)), replace(SETTINGS, seed=1), replace(SETTINGS, k=2)):
        assert _drain(build_pool(engine, scorer, suite, changed, tmp_path))[0].generated
    # A different self-eval identity (another adapter or config) is another key too.
    ident = model_identity(engine, scorer) + "|adapter=other"
    assert _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path, identity=ident))[0].generated
    # Same settings, a prompt whose text changed under the same id: regenerated, the old line ignored.
    prob = suite.problems[0]
    edited = replace(suite, problems=(replace(prob, answer="999999"),))
    assert _drain(build_pool(engine, scorer, edited, SETTINGS, tmp_path))[0].generated


def test_rescoring_an_earlier_pool_reproduces_its_scores_without_generating(engine, scorer, tmp_path):
    from edge_adapt.eval.pool import samples_in

    suite = arith_suite("test", 2)
    first = [s.pool for s in _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path))]
    decoded = engine.decoded_tokens
    ident = model_identity(engine, scorer) + "|adapter=other"  # another scorer's key: nothing cached under it
    steps = _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path, identity=ident, rescore=samples_in(tmp_path, suite)))
    assert not any(s.generated for s in steps)
    for old, new in zip(first, (s.pool for s in steps)):
        assert new.key != old.key and new.rescore_s > 0
        for a, b in zip((*old.samples, old.greedy), (*new.samples, new.greedy)):
            assert (a.text, a.tokens, a.correct) == (b.text, b.tokens, b.correct)  # the same samples
            assert [x is None for x in a.scores] == [x is None for x in b.scores]  # scored at the same points
            # prefilled instead of generated token by token: the same KV up to float rounding
            assert b.end_score == pytest.approx(a.end_score, abs=0.02)
            assert [x for x in b.scores if x is not None] == pytest.approx([x for x in a.scores if x is not None], abs=0.02)
            assert b.selfeval_tokens == a.selfeval_tokens
    # decoded: each prompt once, each response's recorded tokens once, and the suffixes; nothing sampled
    expected = sum(len(p.prompt_ids) + sum(len(x.tokens) + sum(x.selfeval_tokens) for x in (*p.samples, p.greedy))
                   for p in (s.pool for s in steps))
    assert engine.decoded_tokens - decoded == expected
    assert engine.free_sequences == SETTINGS.k + 2
    again = _drain(build_pool(engine, scorer, suite, SETTINGS, tmp_path, identity=ident))  # cached under its key
    assert [s.pool.greedy.end_score for s in again] == [s.pool.greedy.end_score for s in steps]


def test_a_pool_without_max_tokens_gives_each_problem_its_own_budget(engine, scorer, tmp_path):
    suite = arith_suite("test", 2)
    short, long = replace(suite.problems[0], max_tokens=3), replace(suite.problems[1], max_tokens=9)
    mixed = replace(suite, problems=(short, long))
    settings = replace(SETTINGS, max_tokens=None, prune_points=())
    pools = [s.pool for s in build_pool(engine, scorer, mixed, settings, tmp_path)]
    assert max(s.n_tokens for s in (*pools[0].samples, pools[0].greedy)) == 3  # cut at its own budget
    assert max(s.n_tokens for s in (*pools[1].samples, pools[1].greedy)) > 3
    assert all(s.n_tokens <= 9 for s in (*pools[1].samples, pools[1].greedy))
    # The budget the run gives overrides the problem's.
    fixed = [s.pool for s in build_pool(engine, scorer, mixed, replace(settings, max_tokens=5), tmp_path / "b")]
    assert max(s.n_tokens for p in fixed for s in (*p.samples, p.greedy)) == 5


def test_a_mix_takes_the_samples_of_its_families_own_pools(engine, scorer, tmp_path):
    from edge_adapt.eval.pool import samples_in
    from edge_adapt.tasks import FAMILIES, family_suite, mix_suite

    fams = [FAMILIES["compare"], FAMILIES["sequence"]]
    own = {}
    for fam in fams:  # each family's own run, its budget given explicitly as `--max-tokens 64` would
        suite = family_suite(fam, "validation", 1)
        (step,) = build_pool(engine, scorer, suite, replace(SETTINGS, max_tokens=fam.max_tokens), tmp_path / "c")
        own[step.pool.problem_id] = step.pool
    mix = mix_suite(fams, "validation", 2)
    steps = list(build_pool(engine, scorer, mix, replace(SETTINGS, max_tokens=None), tmp_path / "mix",
                            rescore=samples_in(tmp_path / "c", mix)))
    assert [s.generated for s in steps] == [False, False]  # scored again, never sampled again
    for s in steps:
        assert [x.tokens for x in s.pool.samples] == [x.tokens for x in own[s.pool.problem_id].samples]
    # Another budget is other samples: not taken.
    other = list(build_pool(engine, scorer, mix, replace(SETTINGS, max_tokens=8), tmp_path / "mix8",
                            rescore=samples_in(tmp_path / "c", mix)))
    assert [s.generated for s in other] == [True, True]


def test_a_cached_pool_is_judged_by_the_scorer_of_this_run(engine, scorer, tmp_path):
    """The cache keys what the replies depend on, not the scorer: another --scorer reuses the replies and judges
    them again (it used to report the first scorer's right/wrong marks)."""
    from edge_adapt.tasks.scorers import resolve_scorer

    suite = arith_suite("test", 2)
    first = [p.pool for p in build_pool(engine, scorer, suite, SETTINGS, tmp_path)]
    for spec in ("regex:ZZZ-no-match", r"regex:(\w+)\W*$"):
        check = resolve_scorer(spec)
        again = [p for p in build_pool(engine, scorer, replace(suite, scorer=check), SETTINGS, tmp_path)]
        assert not any(p.generated for p in again)  # the same replies, from the cache
        for old, new in zip(first, (p.pool for p in again)):
            assert [s.text for s in new.samples] == [s.text for s in old.samples]
            for s in (*new.samples, new.greedy):
                assert (s.extracted, s.correct) == (check.extract(s.text), check.correct(s.text, new.answer))
        if spec.startswith("regex:ZZZ"):
            assert not any(s.correct for p in again for s in (*p.pool.samples, p.pool.greedy))


def test_a_model_of_the_same_shape_with_other_weights_is_another_model(tmp_path):
    """The fingerprint keying pools, label files, policies and snapshots named only the shape
    (architecture:params:vocab:quantization): a full fine-tune exported at the same quantization read its base's
    cached samples, and took its base's policy."""
    import shutil

    import gguf
    import numpy as np

    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.gguf_file import inspect_gguf
    from edge_adapt.engine.vocab import fingerprint, same_model
    from edge_adapt.errors import UsageError
    from edge_adapt.strategies.policy import Policy

    base = inspect_gguf(default_model_path())
    copy = shutil.copy(default_model_path(), tmp_path / "copy.gguf")
    assert fingerprint(inspect_gguf(copy)) == fingerprint(base)  # the bytes, not the path
    tuned = tmp_path / "tuned.gguf"
    shutil.copy(default_model_path(), tuned)
    reader = gguf.GGUFReader(tuned, "r+")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    norm.data[:] = np.asarray(norm.data) * 1.7
    del reader
    other = fingerprint(inspect_gguf(tuned))
    assert other != fingerprint(base) and other.rsplit(":", 1)[0] == fingerprint(base).rsplit(":", 1)[0]
    policy = Policy(model=fingerprint(base), bin_edges=[0.2, 0.4, 0.6, 0.8], budgets={2: [{"strategy": "probe"}] * 5})
    with pytest.raises(UsageError, match="tuned for model"):
        policy.check_model(other)
    # A file written before fingerprints held a digest names the shape only, and is taken for that shape.
    legacy = fingerprint(base).rsplit(":", 1)[0]
    assert same_model(legacy, other) and not same_model(legacy, "llama:1:2:Q8_0:0123456789ab")
    # Samples a server drew name it and the GGUF that tokenized them: label files and policies made with
    # `--backend` were refused by `train` and `--strategy auto` ("labels were made with remote:...").
    assert same_model(f"remote:served-name|tokenizer={fingerprint(base)}", fingerprint(base))
    assert not same_model(f"remote:served-name|tokenizer={fingerprint(base)}", other)
