"""A decode's logits: read where llama.cpp wrote them, copied out beside the step that reads them.

llama.cpp writes a decode's logits into a buffer of its own, which the next decode overwrites, so every row a
sequence keeps is copied into an array of the engine's: a step's log-probabilities are computed during the next
decode, a sample that stops keeps its row. The copy is a pass over n x n_vocab floats in memory, mostly out of
cache after a decode: 0.16-0.3 ms for 16 rows of 49,152 on the 2-core VM, about a tenth of a step where the decode
is fast (a GPU's, the `tiny` proxy's). A step that reads its rows first samples from llama.cpp's buffer in place
while idle workers make the copy, and takes up the pieces they have not when it must wait (Engine.steps); anything
else that reads a sequence's row waits for the copy (Sequence.logits), and so does the next decode.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor

import numpy as np


# A copy smaller than this is made in line, and the step reads the copy as before: handing it to a worker and
# waiting for it took longer (tiny proxy, 2-core VM, one worker making the whole copy, A/B: 1, 4 and 8 rows of 49,152
# were faster in line, 16 and 64 beside, by 3-9%), a thread's wake-up being a good part of 0.1 ms there.
_BESIDE_FROM_BYTES = 2 << 20


class Outputs:
    """The rows of one decode's logits. Row i of `block` (the sequences' own) is row order[i] of `view` (llama.cpp's
    buffer, in the batch's order), once the copy is done; `view` is only valid until the next decode."""

    def __init__(self, view: np.ndarray, order: list[int]) -> None:
        self.view = view
        self.order = order
        self.in_order = order == list(range(len(order)))
        self.block = np.empty(view.shape, dtype=np.float32)
        self.rows = list(self.block)  # as handed to the sequences: `span` finds them by identity
        self._at = {id(row): i for i, row in enumerate(self.rows)}  # rows keeps them alive, so an id found is one
        self._pieces: list[tuple[int, int]] | None = None  # None: the copy has not started
        self._front = self._back = 0  # pieces [front, back) are not taken yet
        self._left = 0  # pieces not copied yet
        self._cond: threading.Condition | None = None  # None: copied in line (once started)
        self._error: BaseException | None = None

    @property
    def started(self) -> bool:
        return self._pieces is not None

    def span(self, rows: list[np.ndarray | None]) -> int | None:
        """lo where `rows` are rows lo..lo+n-1 of this decode's, in that order, else None."""
        lo = self._at.get(id(rows[0]))
        if lo is None or lo + len(rows) > len(self.rows):
            return None
        for i, row in enumerate(rows):
            if self.rows[lo + i] is not row:
                return None
        return lo

    @property
    def worth_a_worker(self) -> bool:
        """Whether handing the copy to a worker can gain anything (it is not small)."""
        return self.block.nbytes >= _BESIDE_FROM_BYTES

    def copy(self, pool: Executor | None = None, workers: int = 1) -> None:
        """Start the copy: on `workers` of `pool`'s threads, or in line without a pool. Once.

        The rows go in one piece more than there are workers: the workers take pieces from the front, and the step,
        once it has sampled and has to wait for the copy, takes what is left from the back itself instead of waiting
        idle (where sampling takes longer than the copy, the workers have taken every piece by then). Few pieces:
        each is a call a worker makes with the GIL, which the step, between its own numpy calls, waits for (small
        pieces made a sampled step slower)."""
        if self._pieces is not None:
            return
        n = len(self.order)
        if pool is None:
            self._copy_rows(0, n)
            self._pieces = []
            return
        k = min(n, workers + 1)
        self._cond = threading.Condition()
        self._pieces = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        self._back = self._left = k
        for _ in range(min(workers, k)):
            pool.submit(self._take, from_front=True)

    def wait(self) -> None:
        """Until `block` holds every row: copies the pieces nobody has taken up (all of them if the copy has not
        started), then waits for those others are copying."""
        if self._pieces is None:
            self.copy()
        if self._cond is None:
            return
        self._take(from_front=False)
        with self._cond:
            self._cond.wait_for(lambda: self._left == 0)
        if self._error is not None:
            raise self._error

    def _take(self, *, from_front: bool) -> None:
        """Copy pieces until none is left to take (from the front: the workers; from the back: whoever waits)."""
        assert self._cond is not None and self._pieces is not None
        while True:
            with self._cond:
                if self._front >= self._back:
                    return
                if from_front:
                    i, self._front = self._front, self._front + 1
                else:
                    self._back -= 1
                    i = self._back
            try:
                self._copy_rows(*self._pieces[i])
            except BaseException as e:  # noqa: BLE001 - raised by wait(), where the step reads the rows
                self._error = self._error or e
            finally:
                with self._cond:
                    self._left -= 1
                    if self._left == 0:
                        self._cond.notify_all()

    def _copy_rows(self, a: int, b: int) -> None:
        # numpy lets go of the GIL in both (take's default mode='raise' would copy through a buffer of its own)
        if self.in_order:
            np.copyto(self.block[a:b], self.view[a:b])
        else:
            np.take(self.view, self.order[a:b], axis=0, out=self.block[a:b], mode="clip")
