"""Sampling's candidate search: the block shortcut picks exactly what a partition of the whole tail picks."""

from __future__ import annotations

import numpy as np
import pytest

from edge_adapt.engine.sampling import _TAIL_NATS, _candidates, _top_k_by_blocks


def _whole_tail(row: np.ndarray, top_k: int, temperature: float) -> np.ndarray:
    """The candidates as sampling found them before the shortcut: partition every token of the tail."""
    idx = np.flatnonzero(row >= row.max() - _TAIL_NATS * temperature)
    if top_k and len(idx) > top_k:
        idx = idx[np.argpartition(-row[idx], top_k - 1)[:top_k]]
    return idx[np.argsort(-row[idx], kind="stable")]


def _rows(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = []
    for vocab in (49_152, 128_256, 32_007, 1_000):  # the default model's, Llama 3's, ragged blocks, a small one
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
        np.testing.assert_array_equal(_candidates(row, top_k, temperature), _whole_tail(row, top_k, temperature))


def test_the_shortcut_is_taken_without_ties_and_left_where_values_tie():
    rng = np.random.default_rng(0)
    row = (rng.standard_normal(49_152) * 3).astype(np.float32)
    top = _top_k_by_blocks(row, 40)
    assert top is not None and list(top) == list(np.argsort(-row, kind="stable")[:40])
    tied = np.round(rng.standard_normal(49_152) * 3, 1).astype(np.float32)  # many equal values near the top
    assert _top_k_by_blocks(tied, 40) is None
    for top_k in (1, 40):
        np.testing.assert_array_equal(_candidates(tied, top_k, 0.8), _whole_tail(tied, top_k, 0.8))
    assert _top_k_by_blocks(row[:2_000], 40) is None  # too short a row to gain anything
