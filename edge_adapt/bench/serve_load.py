"""A bounded loopback load test of `edge-adapt serve`; run by hand, never in CI (issue 24).

`--requests` requests (default 300) from `--clients` concurrent client threads (default 16), each with its own
`openai.OpenAI(max_retries=0)`, drawn from a seeded mix: n in {1, 2, 4}, max_tokens in {8, 32, 64}, streaming or
not, some with an `edge_adapt` strategy (best-of-n budget 4, adaptive budget 4, prune budget 4 keep 2 at 8
tokens). 10% of the requests disconnect midway: a stream is closed after its first content chunk, a plain
request is abandoned after a short client timeout.

Every request must end in 200 or 429 (a disconnect ends however the client left it); anything else is a failure
and is printed. Afterwards: /metrics live sequences back to 0 within 2 s, and the server's RSS (VmRSS) after the
run within 5% of its RSS after a warm-up of the same mix. `--max-seconds` bounds the whole run; the server the
script started is stopped on the way out.

    python -m edge_adapt.bench.serve_load [--requests 300] [--clients 16] [--url http://127.0.0.1:PORT --pid PID]
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.bench import servers as srv

PROMPTS = (
    "What is 12 + 7?", "Name three colours of the rainbow.", "Write a short poem about the sea.",
    "Natalia sold 48 clips in April and half as many in May. How many in total?",
    "Explain why the sky is blue in two sentences.", "Tom has 38 pens and gets 45 more. How many pens now?",
    "Give me a recipe for pancakes.", "What is the capital of France?", "Tell me a story about a brave mouse.",
    "List the days of the week.",
)
STRATEGIES: tuple[dict[str, Any], ...] = (
    {"strategy": "best-of-n", "budget": 4},
    {"strategy": "adaptive", "budget": 4},
    {"strategy": "prune", "budget": 4, "keep": 2, "prune_at": [8]},
)
LIVE = "edge_adapt_live_sequences"


@dataclass(frozen=True)
class LoadRequest:
    index: int
    prompt: str
    n: int
    max_tokens: int
    stream: bool
    seed: int
    strategy: dict[str, Any] | None = None
    disconnect: bool = False
    disconnect_after_s: float = 0.0  # client timeout of a plain request that disconnects


def request_mix(count: int, seed: int, disconnect_share: float = 0.1, strategy_share: float = 0.3) -> list[LoadRequest]:
    """A seeded mix; a strategy request has n=1 (its budget is the sample count), and a prune request at least
    32 tokens so its prune point (8) lies inside the answer."""
    rng = random.Random(seed)
    disconnecting = set(rng.sample(range(count), round(count * disconnect_share)))
    out = []
    for i in range(count):
        strategy = rng.choice(STRATEGIES) if rng.random() < strategy_share else None
        max_tokens = rng.choice((32, 64) if strategy and strategy["strategy"] == "prune" else (8, 32, 64))
        out.append(LoadRequest(index=i, prompt=rng.choice(PROMPTS), n=1 if strategy else rng.choice((1, 2, 4)),
                               max_tokens=max_tokens, stream=rng.random() < 0.5, seed=rng.randrange(1 << 30),
                               strategy=strategy, disconnect=i in disconnecting,
                               disconnect_after_s=rng.uniform(0.05, 0.5)))
    return out


@dataclass
class Outcome:
    index: int
    kind: str
    status: str  # "200", "429", "disconnected", or the failing status / exception name
    wall_s: float
    tokens: int = 0
    detail: str = ""
    ok: bool = True


def kind_of(r: LoadRequest) -> str:
    what = r.strategy["strategy"] if r.strategy else f"n={r.n}"
    return f"{what}{' stream' if r.stream else ''}{' disconnect' if r.disconnect else ''}"


def send(client: Any, model: str, r: LoadRequest, deadline: float) -> Outcome:
    """One request through the official client; classifies how it ended."""
    import openai

    t0 = time.perf_counter()
    kind = kind_of(r)
    kwargs: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": r.prompt}], "n": r.n,
                              "max_tokens": r.max_tokens, "seed": r.seed}
    if r.strategy:  # sampled at the strategy's own temperature (0.7; adaptive's schedule reads none)
        kwargs["extra_body"] = {"edge_adapt": r.strategy}
    else:
        kwargs["temperature"] = 0.7
    remaining = max(1.0, deadline - time.monotonic())
    if r.disconnect and not r.stream:
        remaining = r.disconnect_after_s
    c = client.with_options(timeout=remaining)
    try:
        if r.stream:
            tokens = 0
            stream = c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
            try:
                for chunk in stream:
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                    if r.disconnect and any(ch.delta is not None and ch.delta.content for ch in chunk.choices):
                        stream.close()
                        return Outcome(r.index, kind, "disconnected", time.perf_counter() - t0)
            finally:
                stream.close()
            if r.disconnect:  # ended before any content: nothing left to cut
                return Outcome(r.index, kind, "200", time.perf_counter() - t0, tokens, "ended before disconnecting")
            return Outcome(r.index, kind, "200", time.perf_counter() - t0, tokens)
        resp = c.chat.completions.create(**kwargs)
        detail = ""
        if len(resp.choices) != r.n and not r.strategy:
            detail = f"{len(resp.choices)} choices for n={r.n}"
        if r.strategy and not (resp.model_extra or {}).get("edge_adapt"):
            detail = "no top-level edge_adapt in a strategy response"
        return Outcome(r.index, kind, "200", time.perf_counter() - t0, resp.usage.completion_tokens if resp.usage else 0,
                       detail, ok=not detail)
    except openai.APITimeoutError as exc:
        if r.disconnect:
            return Outcome(r.index, kind, "disconnected", time.perf_counter() - t0)
        return Outcome(r.index, kind, "timeout", time.perf_counter() - t0, detail=str(exc), ok=False)
    except openai.APIStatusError as exc:
        status = str(exc.status_code)
        body = exc.response.text[:300] if exc.response is not None else ""
        if status == "429" and exc.response is not None and "retry-after" not in exc.response.headers:
            return Outcome(r.index, kind, status, time.perf_counter() - t0, detail=f"no Retry-After header: {body}",
                           ok=False)
        return Outcome(r.index, kind, status, time.perf_counter() - t0, detail=body, ok=status == "429")
    except Exception as exc:  # noqa: BLE001 - every other ending is a failure, reported with its request
        return Outcome(r.index, kind, type(exc).__name__, time.perf_counter() - t0, detail=str(exc)[:300], ok=False)


def drive(server: srv.Server, reqs: list[LoadRequest], clients: int, deadline: float,
          sample_every_s: float = 0.0) -> tuple[list[Outcome], float, list[dict[str, float]]]:
    """`clients` threads pull requests off one queue until it is empty or the deadline passes. With
    `sample_every_s`, the server's RSS, KV cells in use and cached prefixes are sampled that often (a leak grows
    with the requests served; pages of preallocated buffers touched for the first time level off)."""
    import openai

    todo: queue.Queue[LoadRequest] = queue.Queue()
    for r in reqs:
        todo.put(r)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker() -> None:
        client = openai.OpenAI(base_url=server.api, api_key="x", max_retries=0)
        while time.monotonic() < deadline:
            try:
                r = todo.get_nowait()
            except queue.Empty:
                return
            o = send(client, server.model, r, deadline)
            with lock:
                outcomes.append(o)
            if o.status == "429":
                time.sleep(0.2)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    samples: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    next_sample = 0.0
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 5.0:
        if sample_every_s and time.perf_counter() - t0 >= next_sample:
            next_sample += sample_every_s
            samples.append(_sample(server, time.perf_counter() - t0, len(outcomes)))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    if sample_every_s:
        samples.append(_sample(server, wall, len(outcomes)))
    with lock:
        return list(outcomes), wall, samples


def _sample(server: srv.Server, t: float, done: int) -> dict[str, float]:
    row = {"t_s": round(t, 1), "done": done, "rss_kib": server.rss_kib() or 0}
    try:
        m = srv.metrics(server.url)
        row |= {"kv_cells_used": m.get("edge_adapt_kv_cells_used", -1),
                "prefix_cache_entries": m.get("edge_adapt_prefix_cache_entries", -1)}
    except Exception:  # noqa: BLE001, S110 - a missed sample is only a missing row
        pass
    return row


def live_sequences(url: str, wait_s: float = 2.0) -> tuple[float | None, float]:
    """Poll /metrics until live sequences read 0 or `wait_s` passed: (last value, seconds waited)."""
    t0 = time.monotonic()
    value = None
    while True:
        try:
            value = srv.metrics(url).get(LIVE)
        except Exception:  # noqa: BLE001
            value = None
        if value == 0 or time.monotonic() - t0 >= wait_s:
            return value, time.monotonic() - t0
        time.sleep(0.1)


@dataclass(frozen=True)
class LoadConfig:
    requests: int = 300
    clients: int = 16
    warmup: int = 32
    seed: int = 0
    model: Path | None = None
    parallel: int = 16
    ctx: int = 256
    threads: int = 2
    serve_args: tuple[str, ...] = ()
    url: str | None = None
    pid: int | None = None
    max_seconds: float = 900.0
    sample_every_s: float = 10.0


@dataclass
class LoadReport:
    config: dict[str, Any]
    statuses: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0
    not_sent: int = 0
    wall_s: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    tokens: int = 0
    tok_s: float = 0.0
    warmup_statuses: dict[str, int] = field(default_factory=dict)
    rss_after_warmup_kib: int | None = None
    rss_after_run_kib: int | None = None
    rss_ratio: float | None = None
    live_sequences_end: float | None = None
    live_wait_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_error: str | None = None
    samples: list[dict[str, float]] = field(default_factory=list)  # RSS / KV cells over the run
    server_alive: bool = True
    server_log: str | None = None
    server_log_tail: str = ""
    stopped: str | None = None
    passed: bool = False


def run(cfg: LoadConfig, log: Callable[[str], None] = lambda s: None) -> LoadReport:
    t_start = time.monotonic()
    deadline = t_start + cfg.max_seconds
    rep = LoadReport(config={k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                             for k, v in asdict(cfg).items()})
    if cfg.url:
        ctx = srv.running_server(cfg.url, pid=cfg.pid)
    else:
        ctx = srv.edge_adapt_server(cfg.model, parallel=cfg.parallel, ctx=cfg.ctx, threads=cfg.threads,
                                    extra=cfg.serve_args, timeout=max(1.0, deadline - time.monotonic()))
    with ctx as server:
        rep.server_log = str(server.log) if server.log else None
        log(f"server up at {server.url}; warm-up: {cfg.warmup} requests of the same mix")
        warm, _, _ = drive(server, request_mix(cfg.warmup, cfg.seed + 1), cfg.clients, deadline)
        rep.warmup_statuses = dict(Counter(o.status for o in warm))
        live_sequences(server.url)
        rep.rss_after_warmup_kib = server.rss_kib()
        reqs = request_mix(cfg.requests, cfg.seed)
        log(f"load: {len(reqs)} requests from {cfg.clients} clients, {sum(r.disconnect for r in reqs)} disconnecting")
        outcomes, rep.wall_s, rep.samples = drive(server, reqs, cfg.clients, deadline, cfg.sample_every_s)
        if time.monotonic() >= deadline:
            rep.stopped = f"--max-seconds {cfg.max_seconds:.0f} reached"
        rep.sent = len(outcomes)
        rep.not_sent = len(reqs) - len(outcomes)
        rep.statuses = dict(Counter(o.status for o in outcomes))
        for o in outcomes:
            rep.by_kind.setdefault(o.kind, Counter())[o.status] += 1  # type: ignore[index]
        rep.by_kind = {k: dict(v) for k, v in sorted(rep.by_kind.items())}
        rep.failures = [asdict(o) for o in outcomes if not o.ok]
        done = [o for o in outcomes if o.status == "200"]
        lat = [o.wall_s for o in done if "disconnect" not in o.kind]
        rep.latency_p50_s = float(np.percentile(lat, 50)) if lat else None
        rep.latency_p95_s = float(np.percentile(lat, 95)) if lat else None
        rep.tokens = sum(o.tokens for o in done)
        rep.tok_s = rep.tokens / rep.wall_s if rep.wall_s else 0.0
        rep.live_sequences_end, rep.live_wait_s = live_sequences(server.url)
        rep.rss_after_run_kib = server.rss_kib()
        if rep.rss_after_warmup_kib and rep.rss_after_run_kib:
            rep.rss_ratio = rep.rss_after_run_kib / rep.rss_after_warmup_kib
        try:
            rep.metrics = {k: v for k, v in srv.metrics(server.url).items() if k.startswith("edge_adapt_")}
        except Exception as exc:  # noqa: BLE001
            rep.metrics_error = f"{type(exc).__name__}: {exc}"
        rep.server_alive = server.alive() and srv.get_ok(server.url + "/health")
        if not rep.server_alive or rep.failures:
            rep.server_log_tail = server.log_tail(60)
    rep.passed = (not rep.failures and not rep.stopped and rep.not_sent == 0 and rep.server_alive
                  and rep.live_sequences_end == 0 and (rep.rss_ratio is None or rep.rss_ratio <= 1.05))
    return rep


def render(rep: LoadReport) -> str:
    c = rep.config
    st = ", ".join(f"{k}: {v}" for k, v in sorted(rep.statuses.items()))
    lines = [f"load test: {rep.sent}/{c['requests']} requests sent from {c['clients']} clients in {rep.wall_s:.1f} s"
             + (f"  STOPPED: {rep.stopped}" if rep.stopped else ""),
             f"by status          {st}",
             f"warm-up            {c['warmup']} requests: "
             + ", ".join(f"{k}: {v}" for k, v in sorted(rep.warmup_statuses.items())),
             (f"latency (200)      p50 {rep.latency_p50_s or 0:.2f} s, p95 {rep.latency_p95_s or 0:.2f} s "
              f"(disconnecting requests left out)"),
             f"tokens             {rep.tokens} completion tokens -> {rep.tok_s:.1f} tok/s"]
    kib = rep.rss_after_warmup_kib, rep.rss_after_run_kib
    lines.append("RSS                " + (f"{kib[0] / 1024:.1f} MiB after warm-up, {kib[1] / 1024:.1f} MiB after the run "
                                         f"-> {rep.rss_ratio:.3f} (goal within 5%)" if rep.rss_ratio else
                                         "unknown (give --pid with --url)"))
    if rep.samples:
        picks = [rep.samples[round(i * (len(rep.samples) - 1) / 4)] for i in range(5)]
        lines.append("RSS over the run   " + ", ".join(
            f"{p['done']:.0f} done {p['rss_kib'] / 1024:.1f} MiB" + (f" ({p['kv_cells_used']:.0f} KV cells)"
                                                                   if "kv_cells_used" in p else "")
            for p in picks))
    lines.append(f"live sequences     {rep.live_sequences_end} at the end (after {rep.live_wait_s:.1f} s; goal 0 "
                 f"within 2 s); server {'alive' if rep.server_alive else 'NOT answering /health'}")
    m = rep.metrics
    if m.get("edge_adapt_decode_steps_total"):
        lines.append(f"decode steps       {m['edge_adapt_decode_steps_total']:.0f}, "
                     f"{m.get('edge_adapt_decode_step_sequences_total', 0) / m['edge_adapt_decode_steps_total']:.2f} "
                     f"sequences per step, max {m.get('edge_adapt_max_step_sequences', float('nan')):.0f}")
    lines.append("by kind            " + "; ".join(
        f"{k} " + "/".join(f"{s}:{v}" for s, v in sorted(d.items())) for k, d in rep.by_kind.items()))
    for f in rep.failures[:20]:
        lines.append(f"FAILED #{f['index']} {f['kind']}: {f['status']} after {f['wall_s']:.2f} s {f['detail']}")
    if len(rep.failures) > 20:
        lines.append(f"... and {len(rep.failures) - 20} more failures (see --json)")
    if rep.server_log_tail:
        lines.append(f"server log tail ({rep.server_log}):\n{rep.server_log_tail}")
    lines.append(f"result             {'PASS' if rep.passed else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edge_adapt.bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--warmup", type=int, default=32, help="requests of the same mix before the RSS baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, help="GGUF for the server the script starts (default: the embedded one)")
    p.add_argument("--parallel", type=int, default=16, help="edge-adapt serve --parallel")
    p.add_argument("--ctx", type=int, default=256, help="edge-adapt serve --ctx")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--serve-args", default="", help="more arguments for edge-adapt serve, one string")
    p.add_argument("--url", help="drive this running server instead of starting one")
    p.add_argument("--pid", type=int, help="its process id, for RSS (with --url)")
    p.add_argument("--max-seconds", type=float, default=900.0, help="hard bound on the whole run")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples during the run")
    p.add_argument("--json", type=Path, help="write the full report here")
    a = p.parse_args(argv)
    cfg = LoadConfig(requests=a.requests, clients=a.clients, warmup=a.warmup, seed=a.seed, model=a.model,
                     parallel=a.parallel, ctx=a.ctx, threads=a.threads, serve_args=tuple(a.serve_args.split()),
                     url=a.url, pid=a.pid, max_seconds=a.max_seconds,
                     sample_every_s=a.sample_every)
    rep = run(cfg, log=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True))
    print(render(rep))
    if a.json:
        a.json.write_text(json.dumps(asdict(rep), indent=2) + "\n")
        print(f"report written to {a.json}")
    raise SystemExit(0 if rep.passed else 1)


if __name__ == "__main__":
    main()
