"""A real `edge-adapt serve` process for the server tests: started on a free port, waited on through /health,
always stopped (and killed if it will not stop) when the test module is done."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

START_TIMEOUT_S = 120.0


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[str], base: str, stderr_path: str, key: str | None) -> None:
        self.proc = proc
        self.base = base  # http://127.0.0.1:PORT
        self.stderr_path = stderr_path
        self.key = key
        self.http = httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {})

    def client(self, **kwargs: object):  # -> openai.OpenAI
        import openai

        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=self.key or "none", max_retries=0, timeout=60,
                             **kwargs)  # type: ignore[arg-type]

    def metrics(self) -> dict[str, float]:
        r = self.http.get("/metrics")
        r.raise_for_status()
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.split()
                out[name.removeprefix("edge_adapt_")] = float(value)
        return out

    def wait_idle(self, timeout: float = 1.0) -> float:
        """Seconds until no sequence is live; fails after `timeout`."""
        t0 = time.monotonic()
        while True:
            live = self.metrics()["live_sequences"]
            if live == 0:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{live:g} sequences still live after {timeout} s")
            time.sleep(0.02)

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextmanager
def running_server(*args: str, key: str | None = None) -> Iterator[ServerProcess]:
    cmd = [sys.executable, "-m", "edge_adapt", "serve", "--port", "0", "--threads", "1", "--device", "cpu", *args]
    if key is not None:
        cmd += ["--api-key", key]
    err = tempfile.NamedTemporaryFile("w+", prefix="edge-adapt-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keeps reading stdout so the server never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    server = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        base = None
        while base is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise RuntimeError(f"edge-adapt serve did not start: {open(err.name).read()}")
            m = re.search(r"edge-adapt serve: listening on (http://\S+)", line)
            base = m.group(1) if m else None
        server = ServerProcess(proc, base, err.name, key)
        while server.http.get("/health").status_code != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"edge-adapt serve never became healthy: {server.stderr()}")
            time.sleep(0.1)
        yield server
    finally:
        if server is not None:
            server.http.close()
        stop(proc)
        err.close()
        os.unlink(err.name)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
