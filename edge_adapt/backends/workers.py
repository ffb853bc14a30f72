"""Threads for requests in flight: ThreadPoolExecutor's `submit` and futures, on daemon threads.

ThreadPoolExecutor joins its threads when the interpreter exits, so one thread blocked on a server that does
not answer (a connect to a host that went away) would hold up Ctrl-C's exit for as long as its timeout. These
threads are joined for a bounded time and never hold the exit; the calls they run stop through their Cancel
(edge_adapt.backends.http), so normally they are all gone when `shutdown` returns.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

JOIN_S = 2.0  # the longest shutdown waits for threads still in a call


class Workers:
    def __init__(self, n: int, name: str) -> None:
        self._n, self._name = n, name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._closed:
            raise RuntimeError("submit after shutdown")
        f: Future[Any] = Future()
        self._queue.put((f, fn, args))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._n:
            t = threading.Thread(target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True)
            t.start()
            self._threads.append(t)
        return f

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            f, fn, args = item
            if f.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    f.set_exception(exc)
                else:
                    f.set_result(result)
                del f, fn, args, item
            self._idle.release()

    def shutdown(self, *, join_s: float = JOIN_S) -> None:
        """Cancel what has not started, let the threads end, and wait up to `join_s` for those still in a call."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + join_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
