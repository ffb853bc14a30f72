"""Pools sampled and scored through an OpenAI-compatible server: `edge-adapt serve` on 127.0.0.1 stands in for
vLLM. The same seeds give the local engine's samples token for token, scores agree within what decoding the
response as one batch allows, a restarted server and a 429 storm are ridden out, and a broken server (a
stdlib HTTP server answering the wrong shapes) gives one line and leaves the cache clean."""

from __future__ import annotations

import json
import os
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


def _cli(*args: str, timeout: float = 180) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "edge_adapt", *args], capture_output=True, timeout=timeout, env=ENV)
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
    """An OpenAI look-alike that answers the model list well and completions in the shape `mode` names."""

    mode = "ok"
    model = {"id": "m", "object": "model"}

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        data: Any = [self.model] if self.mode != "no-models" else "nope"
        if self.mode == "no-answer-tokens":  # a self-eval model whose answers never show up
            data.append({"id": "m:selfeval", "parent": "m", "edge_adapt": {
                "suffix_ids": [2, 21892, 434], "yes_token": 9230, "no_token": 2838, "adapter": "a.gguf",
                "adapter_sha256": "0"}})
        self._send(200, json.dumps({"object": "list", "data": data}).encode())

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        choice: dict[str, Any] = {"index": 0, "text": "4", "finish_reason": "length",
                                  "logprobs": {"tokens": ["token_id:36"], "token_logprobs": [-0.1]}}  # "4"
        mode = self.mode
        if mode == "no-answer-tokens" and json.loads(raw).get("model") == "m:selfeval":
            top = {"token_id:2": -0.1, "token_id:198": -2.5}
            body = {"choices": [{**choice, "logprobs": {"tokens": ["token_id:2"], "token_logprobs": [-0.1],
                                                         "top_logprobs": [top]}}]}
            return self._send(200, json.dumps(body).encode())
        if mode == "not-json":
            return self._send(200, b"<html>gateway</html>", "text/html")
        if mode == "busy":
            self.send_response(503)
            self.send_header("Retry-After", "2")
            body_ = json.dumps({"error": {"message": "warming up"}}).encode()
            self.send_header("Content-Length", str(len(body_)))
            self.end_headers()
            self.wfile.write(body_)
            return None
        if mode == "refuses":
            return self._send(400, json.dumps({"error": {"message": "n is not supported"}}).encode())
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
        else:
            body = {"choices": [choice]}
        self._send(200, json.dumps(body).encode())


@pytest.fixture()
def broken() -> Iterator[tuple[str, type[_Broken]]]:
    handler = type("Handler", (_Broken,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("mode, fragment", [
    ("not-json", "not JSON"), ("refuses", "400 n is not supported"), ("two-choices", "got 2 choices"),
    ("no-logprobs", "per-token log-probabilities"), ("text-tokens", "return_tokens_as_token_ids"),
    ("content-without-ids", "by token id"),
    ("wrong-model", "same model"), ("no-models", "not an OpenAI model list"),
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
    url, handler = broken
    handler.mode = "busy"
    slept: list[float] = []
    client = JsonClient(url, retry=RetryPolicy(give_up_s=5.0), sleep=slept.append)
    with pytest.raises(RemoteError, match="503 warming up, still after"):
        client.post("/completions", {})
    assert slept == [2.0, 2.0] and client.stats.server_errors == 3  # Retry-After: 2, until 5 s would be passed
