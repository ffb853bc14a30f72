"""Local OpenAI-compatible servers for the hand-run server benchmarks: start one on 127.0.0.1, wait until it
answers, hand back its URL, and stop it (its whole process group) on the way out, whatever happened.

- `edge_adapt_server`: `python -m edge_adapt serve ... --port 0`, URL read from its `listening on` line;
- `llama_cpp_server`: llama-cpp-python's own server (`python -m llama_cpp.server`), through
  `edge_adapt.bench.llama_cpp_server` so it loads weights as the engine does;
- `cpp_llama_server`: llama.cpp's C++ `llama-server` binary, when one was built;
- `running_server`: a server somebody else started (`--url`); nothing is stopped.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LISTENING = re.compile(r"edge-adapt serve: listening on (http://\S+)")


class ServerError(RuntimeError):
    """A server did not come up, or died; the message carries the tail of its log."""


@dataclass
class Server:
    name: str
    url: str  # base URL without /v1
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    model: str = "default"  # the model id requests name
    pid: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def rss_kib(self) -> int | None:
        """VmRSS of the server process from /proc (None when unknown or gone)."""
        pid = self.pid or (self.proc.pid if self.proc else None)
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def metrics(url: str) -> dict[str, float]:
    """GET /metrics (Prometheus text) as {name or name{labels}: value}."""
    text = httpx.get(url + "/metrics", timeout=5.0).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            continue
    return out


def first_model_id(url: str) -> str:
    try:
        data = httpx.get(url + "/v1/models", timeout=5.0).json()["data"]
        return str(data[0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return "default"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group this module started, then SIGKILL after 10 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


@contextmanager
def _spawn(name: str, cmd: Sequence[str], ready: Callable[[Server], bool], url: str = "",
           timeout: float = 600.0, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start `cmd` in its own session, log to a temp file, poll `ready` until true; always stop it."""
    log_fd, log_name = tempfile.mkstemp(prefix=f"edge-adapt-bench-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-",
                                      suffix=".log")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                            env=full_env, start_new_session=True)
    os.close(log_fd)
    server = Server(name=name, url=url, proc=proc, log=Path(log_name), pid=proc.pid)
    try:
        deadline = time.monotonic() + timeout
        while not ready(server):
            if proc.poll() is not None:
                raise ServerError(f"{name} exited with {proc.returncode} while starting:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"{name} not ready after {timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.2)
        server.model = first_model_id(server.url)
        yield server
    finally:
        _stop(proc)


def _edge_adapt_ready(server: Server) -> bool:
    if not server.url:
        m = LISTENING.search(server.log.read_text(errors="replace")) if server.log else None
        if not m:
            return False
        server.url = m.group(1).rstrip("/")
    return get_ok(server.url + "/health")


@contextmanager
def edge_adapt_server(model: Path | None, *, parallel: int, ctx: int, threads: int = 2,
                      extra: Sequence[str] = (), timeout: float = 600.0) -> Iterator[Server]:
    cmd = [sys.executable, "-m", "edge_adapt", "serve", *([str(model)] if model else []), "--host", "127.0.0.1",
           "--port", "0", "--parallel", str(parallel), "--ctx", str(ctx), "--threads", str(threads), *extra]
    with _spawn("edge-adapt serve", cmd, _edge_adapt_ready, timeout=timeout) as server:
        yield server


@contextmanager
def llama_cpp_server(model: Path, *, n_ctx: int = 2048, threads: int = 2, interrupt_requests: bool = False,
                     timeout: float = 600.0) -> Iterator[Server]:
    """llama-cpp-python's server. With interrupt_requests (its default), a new request ends the running stream
    early; off, requests wait behind its lock and each runs to its own end."""
    port = free_port()
    cmd = [sys.executable, "-m", "edge_adapt.bench.llama_cpp_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--interrupt_requests", str(interrupt_requests)]
    url = f"http://127.0.0.1:{port}"
    with _spawn("llama_cpp.server", cmd, lambda s: get_ok(s.url + "/v1/models"), url=url, timeout=timeout) as server:
        yield server


@contextmanager
def cpp_llama_server(binary: Path, model: Path, *, parallel: int = 8, ctx: int = 16384, threads: int = 2,
                     extra: Sequence[str] = (), timeout: float = 600.0) -> Iterator[Server]:
    port = free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(ctx), "-t", str(threads), "-tb", str(threads), *extra]
    url = f"http://127.0.0.1:{port}"
    with _spawn("llama-server (C++)", cmd, lambda s: get_ok(s.url + "/health"), url=url, timeout=timeout) as server:
        yield server


@contextmanager
def running_server(url: str, name: str = "edge-adapt serve", pid: int | None = None) -> Iterator[Server]:
    url = url.rstrip("/").removesuffix("/v1")
    if not get_ok(url + "/health") and not get_ok(url + "/v1/models"):
        raise ServerError(f"{url} does not answer /health")
    yield Server(name=name, url=url, model=first_model_id(url), pid=pid)
