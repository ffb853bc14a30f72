"""engine.outputs: a decode's rows copied out of llama.cpp's buffer, by workers and by whoever waits for them."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edge_adapt.engine.outputs import Outputs


@pytest.mark.parametrize("order", [list(range(9)), [3, 4, 5, 6, 7, 8, 0, 1, 2], [8, 0, 7, 1, 6, 2, 5, 3, 4]])
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_the_copy_puts_each_callers_row_in_its_place(order: list[int], workers: int):
    view = np.random.default_rng(0).standard_normal((9, 1000)).astype(np.float32)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        out = Outputs(view, order)
        assert not out.started
        out.copy(pool if workers else None, workers)
        assert out.started
        out.wait()
        out.wait()  # again: nothing left to do
    np.testing.assert_array_equal(out.block, view[order])


def test_whoever_waits_copies_the_pieces_no_worker_took_up(monkeypatch: pytest.MonkeyPatch):
    """Three tasks queued on one slow thread: the waiting thread takes the pieces from the back while the thread
    copies the first, and waits for that piece before it returns."""
    copied_by: dict[int, str] = {}
    copy_rows = Outputs._copy_rows
    worker_began = threading.Event()

    def traced(self: Outputs, a: int, b: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            worker_began.set()
            time.sleep(0.05)
        copy_rows(self, a, b)
        copied_by[a] = threading.current_thread().name

    monkeypatch.setattr(Outputs, "_copy_rows", traced)
    view = np.arange(10 * 1000, dtype=np.float32).reshape(10, 1000)
    with ThreadPoolExecutor(1, "worker") as pool:
        out = Outputs(view, list(range(10)))
        out.copy(pool, 3)  # 4 pieces: rows 0-1, 2-4, 5-6, 7-9
        assert worker_began.wait(10)
        out.wait()
        np.testing.assert_array_equal(out.block, view)  # every piece there, the worker's too
    assert set(copied_by) == {0, 2, 5, 7}
    assert copied_by[0].startswith("worker")
    assert all(copied_by[a] == threading.main_thread().name for a in (2, 5, 7))  # done while the worker slept


def test_a_copy_that_fails_on_a_worker_fails_the_wait(monkeypatch: pytest.MonkeyPatch):
    def broken(self: Outputs, a: int, b: int) -> None:
        raise MemoryError("no room")

    monkeypatch.setattr(Outputs, "_copy_rows", broken)
    with ThreadPoolExecutor(2) as pool:
        out = Outputs(np.zeros((4, 1000), dtype=np.float32), list(range(4)))
        out.copy(pool, 2)
        with pytest.raises(MemoryError, match="no room"):
            out.wait()  # raised, not a wait forever


def test_span_finds_rows_of_this_decode_side_by_side_by_identity():
    out = Outputs(np.zeros((5, 10), dtype=np.float32), list(range(5)))
    rows = out.rows
    assert out.span(rows[1:4]) == 1 and out.span(rows) == 0
    assert out.span([rows[1], rows[3]]) is None  # not side by side
    assert out.span([rows[2], rows[1]]) is None  # not in that order
    assert out.span([rows[4], rows[4]]) is None  # past the last row
    assert out.span([rows[0].copy()]) is None  # equal values, another array
    assert out.span([None]) is None
