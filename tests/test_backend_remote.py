"""Pools sampled and scored through an OpenAI-compatible server: `edge-adapt serve` on 127.0.0.1 stands in for
vLLM. The same seeds give the local engine's samples token for token, scores agree within what decoding the
response as one batch allows, a restarted server and a 429 storm are ridden out, and a broken server (a
stdlib HTTP server answering the wrong shapes) gives one line and leaves the cache clean."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from serving import ServerProcess, running_server

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
POOL = dict(suite="arith", n_prompts=3, k=4, max_tokens=32, seed=7, threads=1)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--parallel", "10", "--ctx", "256") as s:
        yield s


def _label(tmp: Path, name: str, **extra: Any) -> dict[str, Any]:
    from edge_adapt.train import LabelConfig
    from edge_adapt.train.labels import label

    out = label(LabelConfig(out=tmp / f"{name}.jsonl", cache_dir=tmp / "cache", cuts=[8, 16], **POOL, **extra))
    lines = [json.loads(line) for line in Path(out).read_text().splitlines()]
    return {"header": lines[0], "prompts": lines[1:], "path": out}


@pytest.fixture(scope="module")
def local_labels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _label(tmp_path_factory.mktemp("local"), "local")


def _cli(*args: str, timeout: float = 180, env: dict[str, str] = ENV) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "edge_adapt", *args], capture_output=True, timeout=timeout, env=env)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def _one_error(result: tuple[int, str, str], fragment: str) -> str:
    rc, _, err = result
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc not in (0, None) and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and fragment in lines[0], lines[0]
    return lines[0]


# -- the same samples, the same scores ----------------------------------------------------------------------
def test_label_through_serve_equals_local(server: ServerProcess, local_labels: dict[str, Any], tmp_path: Path) -> None:
    from edge_adapt.train.labels import read_labels

    remote = _label(tmp_path, "remote", backend=server.base, concurrency=6)
    assert read_labels(remote["path"]).n_rows == read_labels(local_labels["path"]).n_rows > 0  # the same checks pass
    assert remote["header"]["backend"] == server.base and remote["header"]["model"].startswith("remote:")
    assert {k: v for k, v in remote["header"].items() if k not in ("model", "backend")} == \
        {k: v for k, v in local_labels["header"].items() if k not in ("model", "backend")}
    assert remote["prompts"] == local_labels["prompts"]  # every id, text, cut and target


def test_eval_through_serve_matches_local(server: ServerProcess, tmp_path: Path) -> None:
    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval.run import run_eval

    common = dict(POOL, prune_points=[8, 16], cache_dir=tmp_path / "cache")
    remote = run_eval(EvalConfig(**common, backend=server.base, out_dir=tmp_path / "remote"))
    local = run_eval(EvalConfig(**common, out_dir=tmp_path / "local"))
    assert remote.model.startswith("remote:") and remote.pool_file != local.pool_file  # never the same cache
    # (by problem: a remote pool's lines are appended in the order prompts finish)
    pools = [{p["problem_id"]: p for p in map(json.loads, Path(r.pool_file).read_text().splitlines())}
             for r in (remote, local)]
    assert pools[0].keys() == pools[1].keys()
    diffs = []
    for a, b in ((pools[0][i], pools[1][i]) for i in pools[0]):
        assert a["prompt_ids"] == b["prompt_ids"]
        for s, t in zip([*a["samples"], a["greedy"]], [*b["samples"], b["greedy"]]):
            for field in ("tokens", "text", "n_tokens", "finish", "seed", "logprobs", "correct"):
                assert s[field] == t[field], field
            assert [x is None for x in s["scores"]] == [x is None for x in t["scores"]]
            diffs += [abs(x - y) for x, y in zip([*s["scores"], s["end_score"]], [*t["scores"], t["end_score"]])
                      if x is not None]
    # The server decodes each response as one batch, the local pool one token per step: llama.cpp rounds those
    # differently (up to 0.06 seen; test_selfeval_model allows 0.1 for the same difference).
    assert len(diffs) > 10 and max(diffs) <= 0.1
    assert (Path(tmp_path / "remote") / "report.md").is_file()


def test_tune_policy_through_serve(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    tune = ["tune-policy", "-o", str(out), "--prompts", "10", "-k", "2", "--max-tokens", "24", "--prune-at", "8",
            "--budget", "2", "--test-split", "test", "--test-prompts", "4", "--cache", str(tmp_path / "cache"),
            "--backend", server.base]
    rc, _, err = _cli(*tune)
    assert rc == 0, err
    policy = json.loads(out.read_text())
    assert policy["model"].startswith("remote:") and set(policy["budgets"]) == {"2"}
    assert "smollm2-135m-selfeval" in policy["self_eval"]  # the server's adapter, named in the policy
    _one_error(_cli(*tune, "--force", "--live", "auto"), "--live cannot be combined")


def test_429_storm_is_retried(local_labels: dict[str, Any], tmp_path: Path) -> None:
    """Two sequences and a queue of one against 16 requests at once: most are refused with 429 at first,
    retried with backoff, and the pool is the calm one."""
    from edge_adapt.backends import RemoteBackend, RemoteOptions
    from edge_adapt.eval.pool import PoolSettings, build_pool_from
    from edge_adapt.tasks import load_suite

    with running_server("--parallel", "2", "--max-queue", "1", "--ctx", "256") as s:
        backend = RemoteBackend.open(RemoteOptions(url=s.base, concurrency=16), None, scores=False)
        with backend:
            suite = load_suite("arith", split="train", n=POOL["n_prompts"], seed=POOL["seed"])
            settings = PoolSettings(k=4, temperature=0.7, max_tokens=32, prune_points=(), seed=POOL["seed"])
            pools = [p.pool for p in build_pool_from(backend, suite, settings, tmp_path)]
        stats = backend.client.stats
    assert stats.throttled > 5 and stats.retries >= stats.throttled
    want = {p["problem_id"]: [r["ids"] for r in p["rows"] if r["cut"] is None] for p in local_labels["prompts"]}
    for pool in pools:
        assert [list(x.tokens) for x in (*pool.samples, pool.greedy)] == want[pool.problem_id]


def test_restarted_server_is_ridden_out_without_resampling(tmp_path: Path) -> None:
    """The server is killed (-9) while `label` runs and started again on its port: the run waits, goes on,
    and the new server is asked only for prompts that were not finished before the kill."""
    from edge_adapt.train.labels import read_labels

    n, k = 8, 2
    cache = tmp_path / "cache"
    args = ["label", "--out", str(tmp_path / "l.jsonl"), "--prompts", str(n), "-k", str(k), "--max-tokens", "32",
            "--cut", "8", "--cache", str(cache), "--concurrency", "2", "--backend-wait", "90"]
    with running_server("--parallel", "4", "--ctx", "256") as first:
        port = first.base.rsplit(":", 1)[1]
        run = subprocess.Popen([sys.executable, "-m", "edge_adapt", *args, "--backend", first.base],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        deadline = time.monotonic() + 120
        while _cached(cache) < 2:
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.stderr else ""
            time.sleep(0.05)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        done_before = _cached(cache)
    assert done_before < n
    time.sleep(1.0)  # the client meets a closed port meanwhile, and keeps retrying
    with running_server("--parallel", "4", "--ctx", "256", "--port", port) as second:
        _, err = run.communicate(timeout=180)
        assert run.returncode == 0, err.decode()
        asked = second.metrics()["requests_total"]
        assert 0 < asked <= (k + 1) * (n - done_before)
        assert read_labels(tmp_path / "l.jsonl").n_rows > 0
        rc, _, err2 = _cli(*args, "--backend", second.base, "--force")  # everything is cached now
        assert rc == 0, err2
        assert second.metrics()["requests_total"] == asked


def test_ctrl_c_during_a_remote_label_run(server: ServerProcess, tmp_path: Path) -> None:
    """Ctrl-C while requests are in flight: exit 130 with one line within seconds, no label file, and every
    cached prompt a whole line (a rerun resumes from them)."""
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "edge_adapt", "label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "12",
            "-k", "4", "--max-tokens", "48", "--cut", "8", "--cache", str(cache), "--backend", server.base]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 120
    while _cached(cache) < 1:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = run.communicate(timeout=60)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert run.returncode == 130 and len(lines) == 1 and "Traceback" not in err.decode(), err.decode()
    assert time.monotonic() - t0 < 30 and not (tmp_path / "l.jsonl").exists()
    for f in cache.glob("pool-*.jsonl"):
        for line in f.read_text().splitlines():
            json.loads(line)
    server.wait_idle(timeout=10)  # the requests it left are finished or cancelled: no sequence stays held


def _cached(cache: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in cache.glob("pool-*.jsonl")) if cache.exists() else 0


# -- broken servers and bad input -----------------------------------------------------------------------------
class _Broken(BaseHTTPRequestHandler):
    """An OpenAI look-alike that answers the model list well and completions in the shape `mode` names; `seen`
    records each request (method, path, Authorization header), `release` ends the "hang" mode's waits."""

    mode = "ok"
    model = {"id": "SmolLM2-135M-Instruct", "object": "model"}  # the name of --model's, as vLLM would list it
    extra: list[dict[str, Any]] = []  # more model cards
    retry_after = "2"
    hang_s = 120.0
    seen: list[tuple[str, str, str | None]]
    release: threading.Event

    def log_message(self, *args: Any) -> None:
        pass

    def _seen(self, method: str) -> None:
        self.seen.append((method, self.path, self.headers.get("Authorization")))

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _busy(self) -> None:
        self.send_response(503)
        self.send_header("Retry-After", self.retry_after)
        body_ = json.dumps({"error": {"message": "warming up"}}).encode()
        self.send_header("Content-Length", str(len(body_)))
        self.end_headers()
        self.wfile.write(body_)

    def do_GET(self) -> None:  # noqa: N802
        self._seen("GET")
        if self.mode.startswith("loading-until-") and time.monotonic() < float(self.mode.rsplit("-", 1)[1]):
            return self._busy()
        if self.mode == "empty-models":
            return self._send(200, json.dumps({"object": "list", "data": []}).encode())
        data: Any = [self.model, *self.extra] if self.mode != "no-models" else "nope"
        judge = self.mode == "no-answer-tokens"  # a self-eval model whose answers never show up
        if self.mode.startswith("serve-loading-until-"):  # edge-adapt serve: its model listed before it has loaded
            loaded = time.monotonic() >= float(self.mode.rsplit("-", 1)[1])
            if self.path == "/health" and not loaded:
                return self._busy()
            data = [{**self.model, "owned_by": "edge-adapt",
                     **({"edge_adapt": {"fingerprint": _fingerprint()}} if loaded else {})}]
            judge = loaded
        if self.path == "/health":
            return self._send(200, b'{"status": "ok"}')
        if judge:
            data.append({"id": f"{self.model['id']}:selfeval", "parent": self.model["id"], "edge_adapt": {
                "suffix_ids": [2, 21892, 434], "yes_token": 9230, "no_token": 2838, "adapter": "a.gguf",
                "adapter_sha256": _default_adapter_hash()}})
        self._send(200, json.dumps({"object": "list", "data": data}).encode())

    def do_POST(self) -> None:  # noqa: N802
        self._seen("POST")
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        choice: dict[str, Any] = {"index": 0, "text": "4", "finish_reason": "length",
                                  "logprobs": {"tokens": ["token_id:36"], "token_logprobs": [-0.1]}}  # "4"
        mode = self.mode
        if mode == "needs-key" and self.headers.get("Authorization") != "Bearer sesame":  # as edge-adapt serve says
            given = self.headers.get("Authorization")
            what = "Incorrect API key provided" if given else "Missing API key: send 'Authorization: Bearer KEY'"
            return self._send(401, json.dumps({"error": {"message": what, "code": "invalid_api_key"}}).encode())
        if mode == "no-answer-tokens" and json.loads(raw).get("model", "").endswith(":selfeval"):
            top = {"token_id:2": -0.1, "token_id:198": -2.5}
            body = {"choices": [{**choice, "logprobs": {"tokens": ["token_id:2"], "token_logprobs": [-0.1],
                                                         "top_logprobs": [top]}}]}
            return self._send(200, json.dumps(body).encode())
        if mode == "not-json":
            return self._send(200, b"<html>gateway</html>", "text/html")
        if mode == "busy":
            return self._busy()
        if mode == "slow-busy":  # each try takes its time before the 503
            time.sleep(0.6)
            return self._busy()
        if mode == "hang":  # a server that takes the request and never answers
            self.release.wait(self.hang_s)
            return None
        if mode == "refuses":
            return self._send(400, json.dumps({"error": {"message": "n is not supported"}}).encode())
        if mode.startswith("id-"):  # llama-server's shape, a reply of one end-of-text token (id 2) but malformed
            bad = {"id-infinite": "1e400", "id-fraction": "2.7", "id-bool": "true", "id-out-of-vocab": "10000000000"}
            return self._send(200, ('{"choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": '
                                    f'{{"content": [{{"id": {bad[mode]}, "logprob": -0.1}}]}}}}]}}').encode())
        if mode == "two-choices":
            body = {"choices": [choice, {**choice, "index": 1}]}
        elif mode == "no-logprobs":
            body = {"choices": [{**choice, "logprobs": None}]}
        elif mode == "content-without-ids":  # llama-server's shape, but no ids
            body = {"choices": [{**choice, "logprobs": {"content": [{"token": "4", "logprob": -0.1}]}}]}
        elif mode == "text-tokens":
            body = {"choices": [{**choice, "logprobs": {"tokens": ["4"], "token_logprobs": [-0.1]}}]}
        elif mode == "wrong-model":  # ids that do not spell the text: another tokenizer
            body = {"choices": [{**choice, "text": "four hundred"}]}
        elif mode == "nan-logprobs":
            body = {"choices": [{**choice, "logprobs": {"tokens": ["token_id:36"], "token_logprobs": [math.nan]}}]}
        else:
            body = {"choices": [choice]}
        self._send(200, json.dumps(body).encode())


def _fingerprint() -> str:
    from edge_adapt.engine import Vocab

    with Vocab() as vocab:
        return vocab.fingerprint


def _default_adapter_hash() -> str:
    from edge_adapt.engine.default_model import default_selfeval_adapter
    from edge_adapt.eval.pool import file_hash

    return file_hash(default_selfeval_adapter())


@pytest.fixture()
def broken() -> Iterator[tuple[str, type[_Broken]]]:
    handler = type("Handler", (_Broken,), {"seen": [], "release": threading.Event(), "extra": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        handler.release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("mode, fragment", [
    ("not-json", "not JSON"), ("refuses", "400 n is not supported"), ("two-choices", "got 2 choices"),
    ("no-logprobs", "per-token log-probabilities"), ("text-tokens", "return_tokens_as_token_ids"),
    ("content-without-ids", "by token id"),
    ("wrong-model", "same model"), ("no-models", "not an OpenAI model list"),
    ("empty-models", "lists no models"), ("nan-logprobs", "not finite"),
    # token ids that are not whole numbers in the vocabulary: 1e400 was "unexpected OverflowError", 2.7 read as 2
    ("id-infinite", "by token id"), ("id-fraction", "by token id"), ("id-bool", "by token id"),
    ("id-out-of-vocab", "same model"),
])
def test_malformed_answers_are_one_line_and_cache_stays_clean(broken: tuple[str, type[_Broken]], tmp_path: Path,
                                                              mode: str, fragment: str) -> None:
    url, handler = broken
    handler.mode = mode
    cache = tmp_path / "cache"
    _one_error(_cli("label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "2", "-k", "2", "--max-tokens", "8",
                    "--cut", "4", "--cache", str(cache), "--backend", url), fragment)
    assert _cached(cache) == 0 and not (tmp_path / "l.jsonl").exists()
    for f in cache.glob("*") if cache.exists() else []:
        assert f.read_text() == ""


def test_bad_backend_input(server: ServerProcess, broken: tuple[str, type[_Broken]], tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    label = ["label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "2", "-k", "2", "--max-tokens", "8",
             "--cut", "4", "--cache", str(tmp_path / "cache")]
    t0 = time.monotonic()
    _one_error(_cli(*label, "--backend", f"http://127.0.0.1:{closed}", "--backend-wait", "1"), "unreachable")
    assert time.monotonic() - t0 < 60
    _one_error(_cli(*label, "--backend", "ftp://127.0.0.1/x"), "not an http")
    _one_error(_cli(*label, "--backend", server.base, "--backend-model", "llama-3-8b"), "not 'llama-3-8b'")
    evaluate = ["eval", "--prompts", "2", "-k", "2", "--max-tokens", "8", "--prune-at", "4",
                "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "report")]
    _one_error(_cli(*evaluate, "--backend", server.base, "--live", "adaptive"), "--live cannot be combined")
    _one_error(_cli(*evaluate, "--backend", broken[0]), "offers no self-evaluation model")
    broken[1].mode = "no-answer-tokens"
    _one_error(_cli(*evaluate, "--backend", broken[0]), "yes and no (9230, 2838) are not among the top 5")
    _one_error(_cli(*evaluate, "--backend", server.base, "--backend-selfeval", "judge"), "serves no model 'judge'")
    _one_error(_cli(*evaluate, "--backend", server.base, "--adapter", "none"), "start the server with --adapter none")
    assert not (tmp_path / "report").exists() and _cached(tmp_path / "cache") == 0


def test_eval_adapter_must_be_the_servers(server: ServerProcess, tmp_path: Path) -> None:
    """--adapter names the adapter the scores must come from: the server's (by content) or a one-line refusal."""
    import shutil

    from edge_adapt.engine.default_model import default_selfeval_adapter

    copy = tmp_path / "same-weights.gguf"
    shutil.copy(default_selfeval_adapter(), copy)
    evaluate = ["eval", "--prompts", "1", "-k", "2", "--max-tokens", "8", "--prune-at", "4",
                "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "report"), "--backend", server.base]
    rc, _, err = _cli(*evaluate, "--adapter", str(copy))
    assert rc == 0, err
    other = tmp_path / "other.gguf"
    other.write_bytes(copy.read_bytes()[:-1] + bytes([copy.read_bytes()[-1] ^ 1]))  # one bit of its weights
    _one_error(_cli(*evaluate, "--adapter", str(other), "--out", str(tmp_path / "r2")), "not --adapter other.gguf")
    # A server started with --adapter none scores with the base model alone, and says so.
    with running_server("--parallel", "4", "--ctx", "256", "--adapter", "none") as bare:
        card = bare.http.get("/v1/models").json()["data"][1]
        assert card["edge_adapt"]["adapter"] is None and card["edge_adapt"]["adapter_sha256"] is None
        rc, _, err = _cli(*evaluate[:-1], bare.base, "--adapter", "none", "--out", str(tmp_path / "r3"))
        assert rc == 0, err


def test_retry_policy_backs_off_and_gives_up(broken: tuple[str, type[_Broken]]) -> None:
    from edge_adapt.backends.http import JsonClient, RemoteError, RetryPolicy

    p = RetryPolicy(first_s=0.25, max_s=8.0, give_up_s=10)
    for attempt in range(8):
        full = min(8.0, 0.25 * 2**attempt)
        assert full / 2 <= p.delay(attempt, None) <= full  # doubling, capped, with jitter
    assert p.delay(0, 3.0) == 3.0 and p.delay(0, 100.0) == 8.0  # the server's Retry-After, capped
    assert p.delay(0, 0.01) == 0.25  # and floored
    url, handler = broken
    handler.mode, handler.retry_after = "busy", "0.5"
    client = JsonClient(url, retry=RetryPolicy(give_up_s=1.2))
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="503 warming up, still after [23] tries"):
        client.post("/completions", {})
    # Retry-After: 0.5, until 1.2 s from the start would be passed: tries at 0, 0.5 and 1 s (a loaded machine may
    # reach 1.2 s before the third; the bounds hold whatever the tries cost)
    assert 2 <= client.stats.server_errors <= 3 and client.stats.retries == client.stats.server_errors - 1
    assert 0.5 < time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("retry_after", ["0", "-5", "nan"])
def test_retry_after_zero_or_negative_backs_off_and_gives_up(broken: tuple[str, type[_Broken]],
                                                            retry_after: str) -> None:
    """A Retry-After of "now" (or nonsense) is no reason to hammer the server: the call backs off as it would
    without one, and stops at --backend-wait."""
    from edge_adapt.backends.http import JsonClient, RemoteError, RetryPolicy

    assert RetryPolicy().delay(3, float(retry_after)) >= 1.0  # attempt 3's backoff: 2 s with jitter
    url, handler = broken
    handler.mode, handler.retry_after = "busy", retry_after
    client = JsonClient(url, retry=RetryPolicy(give_up_s=1.0))
    failed: list[BaseException] = []

    def call() -> None:
        try:
            client.post("/completions", {})
        except BaseException as exc:  # noqa: BLE001
            failed.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and isinstance(failed[0], RemoteError), client.stats
    assert client.stats.requests <= 6  # backoff from 0.25 s over 1 s: 3 or 4 tries


def test_backend_wait_counts_the_time_the_tries_take(broken: tuple[str, type[_Broken]]) -> None:
    """503s that each take 0.6 s to come back, --backend-wait 1: the call stops once 1 s has passed since its
    start, not after 1 s of sleeping between tries."""
    from edge_adapt.backends.http import JsonClient, RemoteError, RetryPolicy

    url, handler = broken
    handler.mode, handler.retry_after = "slow-busy", "0.25"
    client = JsonClient(url, retry=RetryPolicy(give_up_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="503"):
        client.post("/completions", {})
    # Tries at 0 and 0.85 s; counting only its sleeps, the call made 4 or more tries, over 3 s.
    assert time.monotonic() - t0 < 2.5 and client.stats.server_errors <= 2


@pytest.fixture
def interruptible() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as under a terminal: a shell without job control starts background commands
    with SIGINT ignored, and a test suite run that way would never see the signal a test sends itself."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("mode, sig", [("busy", signal.SIGINT), ("hang", signal.SIGTERM)])
def test_interrupt_ends_a_run_on_a_server_busy_or_silent(broken: tuple[str, type[_Broken]], tmp_path: Path,
                                                        mode: str, sig: signal.Signals) -> None:
    """Ctrl-C or SIGTERM while every request is retried (503, Retry-After 1, --backend-wait 300) or waits on a
    server that never answers: one line and exit 130 at once, not when the retries or the timeout run out."""
    url, handler = broken
    handler.mode, handler.retry_after = mode, "1"
    args = [sys.executable, "-m", "edge_adapt", "label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "2",
            "-k", "2", "--max-tokens", "8", "--cut", "4", "--cache", str(tmp_path / "cache"), "--threads", "1",
            "--backend", url, "--backend-wait", "300", "--concurrency", "3"]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while sum(m == "POST" for m, _, _ in handler.seen) < 3:
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1].decode()
            time.sleep(0.05)
        time.sleep(0.3)  # into the retry sleeps, or the wait for an answer
        run.send_signal(sig)
        t0 = time.monotonic()
        _, err = run.communicate(timeout=20)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert run.returncode == 130 and lines == ["interrupted"], err.decode()
    assert time.monotonic() - t0 < 10  # before: until --backend-wait (300 s) or the request timeout ran out


def test_backend_timeout_bounds_the_wait_for_one_answer(broken: tuple[str, type[_Broken]], tmp_path: Path) -> None:
    """A server that takes requests and never answers (one queueing past its slots) stops the run after
    --backend-timeout, named; it was a fixed 300 s no flag could raise or lower."""
    url, handler = broken
    handler.mode = "hang"
    t0 = time.monotonic()
    _one_error(_cli("label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "2", "-k", "2", "--max-tokens", "8",
                    "--cut", "4", "--cache", str(tmp_path / "cache"), "--backend", url, "--backend-timeout", "2"),
               "no answer within 2 s (--backend-timeout)")
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "l.jsonl").exists()


@pytest.mark.parametrize("flag, value", [("--concurrency", "4"), ("--backend-wait", "5"), ("--backend-timeout", "9"),
                                         ("--backend-model", "m")])
def test_backend_options_without_a_backend_are_refused(flag: str, value: str, tmp_path: Path) -> None:
    """Each was ignored in silence when no --backend was given (the run sampled in process)."""
    _one_error(_cli("label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "2", "-k", "2", flag, value),
               f"label: {flag} is read only with --backend")
    assert not (tmp_path / "l.jsonl").exists()


def test_stopping_a_remote_pool_leaves_no_thread_or_connection(broken: tuple[str, type[_Broken]],
                                                              interruptible: None) -> None:
    """A KeyboardInterrupt while requests wait on a server that never answers: the pool's threads end and its
    connections are closed (the server sees them go) within a couple of seconds."""
    from edge_adapt.backends import RemoteBackend, RemoteOptions
    from edge_adapt.eval.pool import PoolSettings
    from edge_adapt.tasks import load_suite

    url, handler = broken
    with RemoteBackend.open(RemoteOptions(url=url, concurrency=4, give_up_s=1), None, scores=False) as backend:
        handler.mode, handler.hang_s = "hang", 5.0
        suite = load_suite("arith", split="train", n=3, seed=1)
        settings = PoolSettings(k=2, temperature=0.7, max_tokens=8, prune_points=(), seed=1)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            for _ in backend.generate([(p, p.id) for p in suite.problems], suite, settings):
                pass
        stopped = time.monotonic() - t0
    timer.join()
    assert sum(m == "POST" for m, _, _ in handler.seen) >= 3 and stopped < 4.5  # the server would hang 5 s
    assert not [t.name for t in threading.enumerate() if t.name.startswith("edge-adapt-")]


def test_eval_refuses_a_server_without_the_adapter_it_means(server: ServerProcess, tmp_path: Path) -> None:
    """`eval` without --adapter means the default adapter; a server started with --adapter none is refused, as
    --backend-selfeval naming the model that samples is."""
    evaluate = ["eval", "--prompts", "1", "-k", "2", "--max-tokens", "8", "--prune-at", "4",
                "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "report")]
    name = server.http.get("/v1/models").json()["data"][0]["id"]
    _one_error(_cli(*evaluate, "--backend", server.base, "--backend-selfeval", name), "is the model that samples")
    with running_server("--parallel", "2", "--ctx", "256", "--adapter", "none") as bare:
        _one_error(_cli(*evaluate, "--backend", bare.base), "runs no adapter (--adapter none), not the default "
                                                            "adapter smollm2-135m-selfeval.gguf")
    assert not (tmp_path / "report").exists()


def test_selfeval_identity_names_what_the_server_says(broken: tuple[str, type[_Broken]]) -> None:
    """A self-eval model the server says nothing about (a vLLM LoRA module): the pool's identity holds its name
    and the path the server lists, never the local adapter's path, which the server may not run."""
    from edge_adapt.backends import RemoteBackend, RemoteOptions

    url, handler = broken
    handler.extra = [{"id": "judge", "object": "model", "parent": handler.model["id"], "root": "/srv/judge-lora"}]
    with RemoteBackend.open(RemoteOptions(url=url, selfeval_model="judge"), None, scores=True) as backend:
        judged = backend.identity.split("|selfeval=", 1)[1]
    assert judged.startswith("judge:root=/srv/judge-lora:") and "selfeval.gguf" not in judged, judged


def test_the_servers_model_must_be_the_local_one(broken: tuple[str, type[_Broken]], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A server that publishes its model's fingerprint (edge-adapt serve) must run --model's; one that publishes
    none gets one warning when its model's name is not --model's."""
    from edge_adapt.backends import RemoteBackend, RemoteOptions
    from edge_adapt.backends.http import RemoteError
    from edge_adapt.engine import Vocab

    url, handler = broken
    with Vocab() as vocab:
        mine = vocab.fingerprint
    handler.model = {**handler.model, "edge_adapt": {"fingerprint": mine}}
    RemoteBackend.open(RemoteOptions(url=url), None, scores=False).close()
    other = mine.rsplit(":", 1)[0] + ":0123456789ab"  # the same shape and vocabulary, other weights
    handler.model = {**handler.model, "edge_adapt": {"fingerprint": other}}
    with pytest.raises(RemoteError, match="not the model of --model SmolLM2-135M-Instruct.Q4_1.gguf"):
        RemoteBackend.open(RemoteOptions(url=url), None, scores=False)
    assert capsys.readouterr().err == ""
    handler.model = {"id": "meta-llama/Llama-3.1-8B-Instruct", "object": "model"}
    for _ in range(2):
        RemoteBackend.open(RemoteOptions(url=url), None, scores=False).close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "Llama-3.1-8B-Instruct" in err[0], err


def test_loading_servers_are_waited_for_with_backend_wait(broken: tuple[str, type[_Broken]]) -> None:
    """/v1/models answering 503 for 10.5 s (a server loading its model) is waited out under --backend-wait,
    not given up after 10 s whatever --backend-wait says."""
    from edge_adapt.backends import RemoteBackend, RemoteOptions

    url, handler = broken
    handler.mode, handler.retry_after = f"loading-until-{time.monotonic() + 10.5}", "1"
    with RemoteBackend.open(RemoteOptions(url=url, give_up_s=30), None, scores=False) as backend:
        assert backend.model == handler.model["id"]
    assert sum(m == "GET" for m, _, _ in handler.seen) >= 10
    # edge-adapt serve lists its model at once, its fingerprint and self-eval model once loaded (its /health
    # answers 503 until then): the client waits for those.
    handler.mode = f"serve-loading-until-{time.monotonic() + 1.5}"
    with RemoteBackend.open(RemoteOptions(url=url, give_up_s=30), None, scores=True) as backend:
        assert backend.scoring is not None and backend.scoring.model == f"{handler.model['id']}:selfeval"
    assert ("GET", "/health", None) in handler.seen


def test_api_key_is_only_edge_adapts_and_never_shown(broken: tuple[str, type[_Broken]], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """OPENAI_API_KEY is not sent to whatever --backend names; EDGE_ADAPT_BACKEND_KEY is, without a trailing
    newline; a key an HTTP header cannot carry is one line that does not show it."""
    from edge_adapt.backends import RemoteBackend, RemoteOptions

    url, handler = broken
    monkeypatch.delenv("EDGE_ADAPT_BACKEND_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-meant-for-openai")
    RemoteBackend.open(RemoteOptions(url=url), None, scores=False).close()
    monkeypatch.setenv("EDGE_ADAPT_BACKEND_KEY", "sesame\n")
    RemoteBackend.open(RemoteOptions(url=url), None, scores=False).close()
    assert [auth for _, _, auth in handler.seen] == [None, "Bearer sesame"]
    label = ["label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "1", "-k", "2", "--max-tokens", "8",
             "--cache", str(tmp_path / "cache"), "--backend", url]
    line = _one_error(_cli(*label, env={**ENV, "EDGE_ADAPT_BACKEND_KEY": "SECRET\nInjected: 1"}), "API key")
    assert "SECRET" not in line and len(handler.seen) == 2


def test_a_refused_key_names_the_variable_that_sets_it(broken: tuple[str, type[_Broken]], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 401 says where a CLI user's key comes from: $EDGE_ADAPT_BACKEND_KEY, unset or not the server's."""
    from edge_adapt.backends import RemoteBackend, RemoteOptions
    from edge_adapt.backends.http import RemoteError
    from edge_adapt.eval.pool import PoolSettings
    from edge_adapt.tasks import load_suite

    url, handler = broken
    handler.mode = "needs-key"
    label = ["label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "1", "-k", "2", "--max-tokens", "8",
             "--cache", str(tmp_path / "cache"), "--backend", url]
    unset = {k: v for k, v in ENV.items() if k != "EDGE_ADAPT_BACKEND_KEY"}
    line = _one_error(_cli(*label, env=unset), "401 Missing API key")
    assert "no API key was sent: set EDGE_ADAPT_BACKEND_KEY" in line, line
    monkeypatch.setenv("EDGE_ADAPT_BACKEND_KEY", "wrong")
    suite = load_suite("arith", split="train", n=1, seed=1)
    settings = PoolSettings(k=1, temperature=0.7, max_tokens=8, prune_points=(), seed=1)
    with RemoteBackend.open(RemoteOptions(url=url), None, scores=False) as backend, \
            pytest.raises(RemoteError, match="401 Incorrect API key provided .the key sent, from "
                                             "EDGE_ADAPT_BACKEND_KEY, is not the server's"):
        list(backend.generate([(p, p.id) for p in suite.problems], suite, settings))


def test_backend_model_self_eval_is_refused_and_the_servers_aliases_accepted(server: ServerProcess) -> None:
    """MODEL:selfeval only scores: naming it to sample is refused up front, naming the model to use. The names
    edge-adapt serve answers to for its model ('default', the file name) are that model, under its id."""
    from edge_adapt.backends import RemoteBackend, RemoteOptions
    from edge_adapt.errors import UsageError

    name = server.http.get("/v1/models").json()["data"][0]["id"]
    with pytest.raises(UsageError, match=re.escape(f"--backend-model {name}:selfeval is the self-evaluation model "
                                                   f"of {name}") + ".*" + re.escape(f"--backend-model {name} ")):
        RemoteBackend.open(RemoteOptions(url=server.base, model=f"{name}:selfeval"), None, scores=False)
    with RemoteBackend.open(RemoteOptions(url=server.base), None, scores=False) as plain:
        fingerprint = plain.fingerprint
    for alias in ("default", f"{name}.gguf"):
        with RemoteBackend.open(RemoteOptions(url=server.base, model=alias), None, scores=True) as backend:
            assert backend.model == name and backend.fingerprint == fingerprint  # one cache key for all three
            assert backend.scoring is not None and backend.scoring.model == f"{name}:selfeval"


def test_tls_errors_fail_at_once(broken: tuple[str, type[_Broken]]) -> None:
    """https:// to a plain-HTTP server fails the same way on every try: one line now, not after --backend-wait."""
    from edge_adapt.backends.http import JsonClient, RemoteError, RetryPolicy

    url, _ = broken
    client = JsonClient(url.replace("http://", "https://"), retry=RetryPolicy(give_up_s=10))
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="the TLS connection failed .*use http://"):
        client.get("/models")
    assert client.stats.requests == 1 and client.stats.retries == 0 and time.monotonic() - t0 < 5


@pytest.mark.parametrize("url, fragment", [
    ("http://[::1", "not a valid URL"), ("http://127.0.0.1:99999/v1", "out of range"),
    ("http://127.0.0.1:0/v1", "port 0"), ("http:///v1", "names no host"), ("ftp://127.0.0.1/x", "not an http"),
    ("http://user:pw@127.0.0.1:8000/v1", "user name or password"), ("http://h/v1?key=1", "no query"),
])
def test_malformed_urls_are_refused_before_any_request(url: str, fragment: str) -> None:
    from edge_adapt.backends.http import JsonClient
    from edge_adapt.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(fragment)) as exc:
        JsonClient(url)
    assert "pw" not in str(exc.value)
    assert JsonClient("https://[::1]:8443/").base == "https://[::1]:8443/v1"


def test_malformed_url_is_one_line_without_its_password(tmp_path: Path) -> None:
    label = ["label", "--out", str(tmp_path / "l.jsonl"), "--prompts", "1", "-k", "2", "--max-tokens", "8",
             "--cache", str(tmp_path / "cache"), "--backend-wait", "1"]
    t0 = time.monotonic()
    line = _one_error(_cli(*label, "--backend", "http://user:hunter2@127.0.0.1:1/v1"), "user name or password")
    assert "hunter2" not in line
    _one_error(_cli(*label, "--backend", "http://[::1"), "not a valid URL")
    assert time.monotonic() - t0 < 60
