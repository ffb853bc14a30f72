"""Sampling's candidate search: the block shortcut picks exactly what a partition of the whole tail picks."""

from __future__ import annotations

import re

import numpy as np
import pytest

from edge_adapt.engine.sampling import (GREEDY, _TAIL_NATS, SamplingParams, _candidates, _top_k_by_blocks,
                                         sample_rows)


def _whole_tail(row: np.ndarray, top_k: int, temperature: float) -> np.ndarray:
    """The candidates as sampling found them before the shortcut: partition every token of the tail."""
    idx = np.flatnonzero(row >= row.max() - _TAIL_NATS * temperature)
    if top_k and len(idx) > top_k:
        idx = idx[np.argpartition(-row[idx], top_k - 1)[:top_k]]
    return idx[np.argsort(-row[idx], kind="stable")]


def _one_by_one(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]) -> list[int]:
    """Sampling as it was before the shortcuts: each row on its own, its whole tail partitioned."""
    tokens = logits.argmax(axis=-1)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        cand = _whole_tail(logits[row], p.top_k, p.temperature)
        probs = np.exp((logits[row, cand] - logits[row, cand[0]]) / p.temperature, dtype=np.float64)
        probs /= probs.sum()
        keep = (np.cumsum(probs) - probs < p.top_p) & (probs >= p.min_p * probs[0])
        cdf = np.cumsum(np.where(keep, probs, 0.0))
        u = rngs[row].random() * cdf[-1]
        tokens[row] = cand[min(int(np.searchsorted(cdf, u, side="right")), len(cand) - 1)]
    return tokens.tolist()


def _shortcut(row: np.ndarray, top_k: int, temperature: float) -> np.ndarray:
    """The candidates as `sample_rows` finds them: the block search where it stands, else the whole tail."""
    found = _top_k_by_blocks(row[None], top_k) if top_k else None
    return _candidates(row, top_k, temperature, found[0][0] if found is not None and found[1][0] else None)


def _rows(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = []
    # The default model's, Llama 3's, a partial block, whole blocks outside the groups too, a small one.
    for vocab in (49_152, 128_256, 32_007, 40_033, 1_000):
        for spread in (0.5, 3.0, 12.0):  # flat to peaked: a tail of every token down to a few
            rows.append((rng.standard_normal(vocab) * spread).astype(np.float32))
    peaked = (rng.standard_normal(49_152) * 2).astype(np.float32)
    peaked[:5] += 40  # fewer tokens in the tail than top_k
    masked = (rng.standard_normal(49_152) * 3).astype(np.float32)
    masked[[0, 7, 49_151]] = -np.inf  # ignore_eos
    return [*rows, peaked, masked]


@pytest.mark.parametrize("top_k", [1, 5, 40, 100])
@pytest.mark.parametrize("temperature", [0.2, 0.8, 1.5])
def test_block_shortcut_finds_the_candidates_the_whole_tail_gives(top_k: int, temperature: float):
    for row in _rows(top_k):
        np.testing.assert_array_equal(_shortcut(row, top_k, temperature), _whole_tail(row, top_k, temperature))


def test_the_shortcut_stands_without_ties_and_steps_aside_where_values_tie():
    rng = np.random.default_rng(0)
    row = (rng.standard_normal(49_152) * 3).astype(np.float32)
    tied = np.round(rng.standard_normal(49_152) * 3, 1).astype(np.float32)  # many equal values near the top
    found = _top_k_by_blocks(np.stack([row, tied, row * 2]), 40)
    assert found is not None
    top, stands = found
    assert stands.tolist() == [True, False, True]
    assert top[0].tolist() == top[2].tolist() == np.argsort(-row, kind="stable")[:40].tolist()
    for top_k in (1, 40):
        np.testing.assert_array_equal(_shortcut(tied, top_k, 0.8), _whole_tail(tied, top_k, 0.8))
    assert _top_k_by_blocks(row[None, :2_000], 40) is None  # too short a row to gain anything

    # A tie with the 2nd value in a sub-block that is not searched: with 49,152 tokens, block 10 holds the sub-blocks
    # of tokens 10 and 1,546 (sub-block s: tokens s + 6,144 c), and only one of the two tied sub-blocks is chosen.
    sibling = -np.abs(row)
    sibling[[20, 10, 1_546]] = 10.0, 9.0, 9.0
    elsewhere = -np.abs(row)
    elsewhere[[20, 10, 11]] = 10.0, 9.0, 9.0  # the same tie in two blocks
    found = _top_k_by_blocks(np.stack([sibling, elsewhere, -np.abs(row)]), 2)
    assert found is not None and found[1].tolist() == [False, False, True]


def test_rows_sampled_together_pick_what_each_picks_alone():
    """The top-k search runs over every row of a step at once, rows of other settings among them."""
    rows = np.stack([r[:49_152] for r in _rows(7) if len(r) >= 49_152])
    params = [SamplingParams(temperature=0.8, seed=i, top_k=(40, 40, 0, 5)[i % 4]) if i % 5 else GREEDY
              for i in range(len(rows))]
    together = sample_rows(rows, params, [np.random.default_rng(p.seed) for p in params])
    alone = [sample_rows(rows[i : i + 1], [p], [np.random.default_rng(p.seed)])[0] for i, p in enumerate(params)]
    assert together.tolist() == alone


@pytest.mark.parametrize("seed", range(4))
def test_sample_rows_picks_what_sampling_one_row_at_a_time_over_the_whole_tail_picked(seed: int):
    rng = np.random.default_rng(seed)
    rows = np.stack([r[:49_152] for r in _rows(seed) if len(r) >= 49_152] * 3)
    settings = [dict(temperature=t, top_k=k, top_p=tp, min_p=mp) for t in (0.2, 0.8, 1.5) for k in (0, 1, 5, 40)
                for tp, mp in ((0.95, 0.05), (0.5, 0.0), (1.0, 0.3))]
    for _ in range(6):
        picks = rng.choice(len(settings), size=len(rows))
        params = [SamplingParams(seed=int(rng.integers(1 << 30)), **settings[i]) if i % 7 else GREEDY for i in picks]
        ours = sample_rows(rows, params, [np.random.default_rng(p.seed) for p in params])
        assert ours.tolist() == _one_by_one(rows, params, [np.random.default_rng(p.seed) for p in params])


def test_requests_sampled_together_pick_what_each_picks_alone_and_leave_each_generator_where_alone_does():
    """The scheduler samples every request's rows at once (steps.sample_together): greedy-only requests, sampled
    ones, one with a repetition penalty beside ones without, and a row-less request; twice, so the generators'
    states after the first pick are checked too."""
    from edge_adapt.engine.steps import Sampling, sample_together

    rows = np.stack([r[:49_152] for r in _rows(3) if len(r) >= 49_152] * 2)
    kinds = [[GREEDY, GREEDY], [SamplingParams(temperature=0.8, seed=1)],
             [SamplingParams(temperature=1.2, seed=2, top_k=5), GREEDY, SamplingParams(temperature=0.5, seed=3)],
             [SamplingParams(temperature=0.9, seed=4, repeat_penalty=1.5)], []]
    spans, at = [], 0
    for params in kinds:
        spans.append((at, at + len(params)))
        at += len(params)
    assert at <= len(rows)
    recent = {3: [np.asarray(rows[spans[3][0]].argsort()[-3:])]}  # the penalty moves its row's likeliest tokens

    def requests(rngs: list[list[np.random.Generator]]) -> list[Sampling]:
        return [Sampling(rows[a:b], kinds[i], rngs[i], recent.get(i)) for i, (a, b) in enumerate(spans)]

    gens_together = [[np.random.default_rng(p.seed) for p in ps] for ps in kinds]
    gens_alone = [[np.random.default_rng(p.seed) for p in ps] for ps in kinds]
    for _ in range(2):
        together = requests(gens_together)
        sample_together(together)
        for i, r in enumerate(requests(gens_alone)):
            alone = sample_rows(r.logits, r.params, r.rngs, r.recent)
            assert together[i].tokens is not None and together[i].tokens.tolist() == alone.tolist()
    # the penalty changed its row's pick: the rows' own recent tokens reached sample_rows
    plain = sample_rows(rows[spans[3][0] : spans[3][1]], kinds[3], [np.random.default_rng(4)])
    penalised = sample_rows(rows[spans[3][0] : spans[3][1]], kinds[3], [np.random.default_rng(4)], recent[3])
    assert plain.tolist() != penalised.tolist()


@pytest.mark.parametrize(("bias", "message"), [
    (((-1, 1.0),), "logit_bias names token -1: a token id is a whole number >= 0"),  # would bias the last token
    (((1.5, 1.0),), "logit_bias names token 1.5"),
    (((5, float("nan")),), "logit_bias for token 5 must be a finite number, got nan"),
    ("ab", "logit_bias is a sequence of (token id, bias) pairs"),
])
def test_a_bad_logit_bias_is_refused_by_name(bias: object, message: str):
    from edge_adapt.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(message)):
        SamplingParams(logit_bias=bias)  # type: ignore[arg-type]
    assert SamplingParams(logit_bias=[(5, 1)]).logit_bias == ((5, 1.0),)  # a list of pairs is fine (and hashable)


def test_a_tokens_logprob_is_the_same_number_in_the_top_list():
    """A reply's logprob and its entry among the top alternatives are one number (they differed by 1e-9: two
    normalizers)."""
    from edge_adapt.engine.sampling import token_logprobs, top_logprobs

    rng = np.random.default_rng(0)
    for _ in range(20):
        row = (rng.standard_normal(49152) * rng.uniform(0.5, 8)).astype(np.float32)
        top = dict(top_logprobs(row, 5))
        chosen = np.array(list(top))
        assert list(token_logprobs(np.repeat(row[None, :], 5, axis=0), chosen)) == [top[int(t)] for t in chosen]
