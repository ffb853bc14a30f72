"""`edge-adapt serve` against llama-cpp-python's own server (and llama.cpp's C++ `llama-server` when built), side
by side in one run on one GGUF, threads and machine; run by hand, never in CI (issue 24).

1. raw llama.cpp's batching gain: greedy forks decoded together at N sequences vs 1 (`edge_adapt.bench.raw`);
2. per server: C concurrent clients (threads, each with its own `openai.OpenAI`), each sending R streaming chat
   requests of `--max-tokens` tokens at temperature 0.7 with a fixed seed per request: aggregate tokens/s
   (completion tokens summed over the phase / its wall time) and p50 / p95 time to the first content chunk;
3. `n=N` in one request to edge-adapt serve vs N sequential requests to llama-cpp-python's server (which
   ignores `n`): wall time and tokens/s.

Goals printed beside the numbers: edge-adapt / llama_cpp.server tokens/s >= 0.9 x the raw gain, p50 TTFT ratio
<= 0.25, and >= 0.8 x the C++ server's tokens/s. Every server is bound to 127.0.0.1 and stopped on the way out.

    python -m edge_adapt.bench.serve [--model M.gguf] [--requests 3] [--json report.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.bench import servers as srv

TOPICS = (
    "a lighthouse keeper and a storm", "a dragon who learns to bake bread", "a robot that wants to be a gardener",
    "two sisters crossing a desert", "a city built on the back of a whale", "a clockmaker who can stop time",
    "a detective who solves crimes with music", "a ship lost in a sea of fog", "a child who befriends a volcano",
    "a library that rearranges itself at night", "the last tree on a frozen planet", "a chef cooking for a king",
)


def prompt_for(i: int) -> str:
    return (f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}. Describe every place and every "
            f"character, and give the story a beginning, a middle and an end. Part {i // len(TOPICS) + 1}.")


@dataclass
class Timed:
    """One request as the client saw it."""

    ok: bool
    wall_s: float
    ttft_s: float | None = None
    tokens: int = 0
    tokens_from: str = "usage"  # usage | chunks (content chunks counted where a server sends no usage)
    finish_reason: str | None = None
    error: str | None = None


def stream_chat(client: Any, model: str, prompt: str, *, max_tokens: int, seed: int, temperature: float,
                extra_body: dict[str, Any] | None = None) -> Timed:
    """One streaming chat request; TTFT is the time to the first chunk carrying content."""
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage = None
    finish = None
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=temperature, seed=seed, stream=True, stream_options={"include_usage": True},
            extra_body=extra_body)
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for c in chunk.choices:
                if c.delta is not None and c.delta.content:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    chunks += 1
                if c.finish_reason:
                    finish = c.finish_reason
    except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
        return Timed(False, time.perf_counter() - t0, ttft, chunks, "chunks", finish, f"{type(exc).__name__}: {exc}")
    return Timed(True, time.perf_counter() - t0, ttft, usage if usage is not None else chunks,
                 "usage" if usage is not None else "chunks", finish)


def _client(server: srv.Server, timeout: float) -> Any:
    import openai

    return openai.OpenAI(base_url=server.api, api_key="x", max_retries=0, timeout=timeout)


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def concurrent_streams(server: srv.Server, *, clients: int, requests: int, max_tokens: int, temperature: float,
                       seed: int, timeout: float, extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """`clients` threads, each sending `requests` streaming chat requests one after another."""
    results: list[list[Timed]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def worker(c: int) -> None:
        try:
            client = _client(server, timeout)
        finally:
            start.wait()
        for r in range(requests):
            i = c * requests + r
            results[c].append(stream_chat(client, server.model, prompt_for(i), max_tokens=max_tokens,
                                          seed=seed + i, temperature=temperature, extra_body=extra_body))

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = [x for rs in results for x in rs]
    done = [x for x in flat if x.ok]
    ttfts = [x.ttft_s for x in done if x.ttft_s is not None]
    tokens = sum(x.tokens for x in done)
    return {
        "requests": len(flat), "completed": len(done), "tokens": tokens, "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else 0.0,
        "tokens_per_request_mean": tokens / len(done) if done else 0.0,
        "short_requests": sum(x.tokens < max_tokens for x in done),
        "tokens_from": sorted({x.tokens_from for x in done}),
        "ttft_p50_s": _pct(ttfts, 50), "ttft_p95_s": _pct(ttfts, 95),
        "latency_p50_s": _pct([x.wall_s for x in done], 50),
        "errors": [x.error for x in flat if not x.ok][:10],
    }


def n_in_one_request(server: srv.Server, *, n: int, max_tokens: int, temperature: float, seed: int,
                     timeout: float, extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    client = _client(server, timeout)
    t0 = time.perf_counter()
    try:
        r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": prompt_for(0)}],
                                           n=n, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                           extra_body=extra_body)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    tokens = r.usage.completion_tokens if r.usage else 0
    return {"mode": f"one request, n={n}", "choices": len(r.choices), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall}


def n_sequential(server: srv.Server, *, n: int, max_tokens: int, temperature: float, seed: int,
                 timeout: float) -> dict[str, Any]:
    client = _client(server, timeout)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(n):
        try:
            r = client.chat.completions.create(model=server.model,
                                               messages=[{"role": "user", "content": prompt_for(0)}],
                                               max_tokens=max_tokens, temperature=temperature, seed=seed + i)
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}", "wall_s": time.perf_counter() - t0}
        tokens += r.usage.completion_tokens if r.usage else 0
    wall = time.perf_counter() - t0
    return {"mode": f"{n} sequential requests", "choices": n, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


@dataclass(frozen=True)
class ServeBenchConfig:
    model: Path | None = None
    threads: int = 2
    clients: int = 8
    requests: int = 3
    max_tokens: int = 128
    temperature: float = 0.7
    seed: int = 1
    n: int = 8
    parallel: int = 8  # edge-adapt serve --parallel
    ctx: int = 512  # edge-adapt serve --ctx (tokens per sequence)
    llama_cpp_ctx: int = 2048
    llama_cpp_interrupt: bool = False
    servers: tuple[str, ...] = ("edge-adapt", "llama-cpp")
    edge_url: str | None = None
    edge_extra_body: str | None = None  # JSON merged into every edge-adapt request body
    llama_server: Path | None = None  # C++ llama-server binary
    llama_server_args: tuple[str, ...] = ()
    raw: bool = True
    raw_repeats: int = 2
    timeout: float = 600.0  # per request


def _server(name: str, cfg: ServeBenchConfig, model: Path) -> Any:
    if name == "edge-adapt":
        if cfg.edge_url:
            return srv.running_server(cfg.edge_url)
        return srv.edge_adapt_server(cfg.model, parallel=cfg.parallel, ctx=cfg.ctx, threads=cfg.threads)
    if name == "llama-cpp":
        return srv.llama_cpp_server(model, n_ctx=cfg.llama_cpp_ctx, threads=cfg.threads,
                                    interrupt_requests=cfg.llama_cpp_interrupt)
    if name == "cpp":
        if cfg.llama_server is None:
            raise srv.ServerError("no --llama-server binary given")
        from edge_adapt.engine.handles import cpu_has_amx

        # Same weight layout as the engine: on AMX builds, no repacked ("extra") buffer types (see handles.py).
        repack = ("--no-repack",) if cpu_has_amx() and "--no-repack" not in cfg.llama_server_args else ()
        return srv.cpp_llama_server(cfg.llama_server, model, parallel=cfg.clients, ctx=2048 * cfg.clients,
                                    threads=cfg.threads, extra=(*repack, *cfg.llama_server_args))
    raise ValueError(f"unknown server {name!r}: edge-adapt, llama-cpp or cpp")


def _edge_metrics(server: srv.Server) -> dict[str, float]:
    try:
        return {k: v for k, v in srv.metrics(server.url).items() if k.startswith("edge_adapt_")}
    except Exception as exc:  # noqa: BLE001 - the numbers that matter come from the clients
        return {"error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]


def machine() -> str:
    import os

    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def measure_server(name: str, cfg: ServeBenchConfig, model: Path, log: Callable[[str], None]) -> dict[str, Any]:
    extra = json.loads(cfg.edge_extra_body) if (name == "edge-adapt" and cfg.edge_extra_body) else None
    with _server(name, cfg, model) as server:
        out: dict[str, Any] = {"name": server.name, "url": server.url, "log": str(server.log) if server.log else None}
        log(f"{server.name}: up at {server.url}, warm-up request")
        warm = stream_chat(_client(server, cfg.timeout), server.model, "Say hello.", max_tokens=16, seed=0,
                           temperature=cfg.temperature, extra_body=extra)
        if not warm.ok:
            raise srv.ServerError(f"{server.name} warm-up failed: {warm.error}\n{server.log_tail()}")
        log(f"{server.name}: {cfg.clients} clients x {cfg.requests} streaming requests of {cfg.max_tokens} tokens")
        before = _edge_metrics(server) if name == "edge-adapt" else {}
        out["streams"] = concurrent_streams(server, clients=cfg.clients, requests=cfg.requests,
                                            max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                            timeout=cfg.timeout, extra_body=extra)
        if name == "edge-adapt":
            after = _edge_metrics(server)
            # The streaming phase alone: counters after minus before (the warm-up's steps left out).
            out["metrics_streams"] = {k: v - before.get(k, 0.0) if k.endswith("_total") else v
                                      for k, v in after.items()}
            log(f"{server.name}: n={cfg.n} in one request")
            out["n"] = n_in_one_request(server, n=cfg.n, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                        seed=cfg.seed, timeout=cfg.timeout, extra_body=extra)
            out["metrics"] = _edge_metrics(server)
        elif name == "llama-cpp":
            log(f"{server.name}: {cfg.n} sequential requests")
            out["n"] = n_sequential(server, n=cfg.n, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                    seed=cfg.seed, timeout=cfg.timeout)
        if not server.alive():
            out["died"] = server.log_tail()
        return out


def run_all(cfg: ServeBenchConfig, log: Callable[[str], None] = lambda s: None,
            res: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every section in order; `res` (filled as it goes) keeps what was measured if the run is stopped."""
    from edge_adapt.engine.default_model import default_model_path

    model = cfg.model or default_model_path()
    res = {} if res is None else res
    res.update({"config": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                                      for k, v in asdict(cfg).items()},
                           "model": str(model), "machine": machine(),
                           "servers": {}, "goals": {}})
    if cfg.raw:
        from edge_adapt.bench.raw import batching_gain

        log(f"raw llama.cpp: forked greedy decode at {cfg.clients} sequences vs 1")
        res["raw"] = batching_gain(model, n_seq=cfg.clients, tokens=cfg.max_tokens, threads=cfg.threads,
                                   repeats=cfg.raw_repeats)
    for name in cfg.servers:
        try:
            res["servers"][name] = measure_server(name, cfg, model, log)
        except Exception as exc:  # noqa: BLE001 - one server failing must not lose the others' numbers
            res["servers"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name}: FAILED {type(exc).__name__}: {exc}")
    res["goals"] = goals(res)
    return res


def _tok_s(res: dict[str, Any], name: str) -> float | None:
    s = res["servers"].get(name, {}).get("streams")
    return s["tok_s"] if s and s["completed"] else None


def goals(res: dict[str, Any]) -> dict[str, Any]:
    g: dict[str, Any] = {}
    ours, theirs, cpp = _tok_s(res, "edge-adapt"), _tok_s(res, "llama-cpp"), _tok_s(res, "cpp")
    if ours and theirs:
        g["throughput_ratio"] = ours / theirs
        if "raw" in res:
            g["throughput_goal"] = 0.9 * res["raw"]["gain"]
            g["throughput_met"] = g["throughput_ratio"] >= g["throughput_goal"]
        t_ours = res["servers"]["edge-adapt"]["streams"]["ttft_p50_s"]
        t_theirs = res["servers"]["llama-cpp"]["streams"]["ttft_p50_s"]
        if t_ours is not None and t_theirs:
            g["ttft_ratio"] = t_ours / t_theirs
            g["ttft_met"] = g["ttft_ratio"] <= 0.25
    if ours and cpp:
        g["cpp_ratio"] = ours / cpp
        g["cpp_met"] = g["cpp_ratio"] >= 0.8
    n_ours = res["servers"].get("edge-adapt", {}).get("n", {})
    n_theirs = res["servers"].get("llama-cpp", {}).get("n", {})
    if n_ours.get("wall_s") and n_theirs.get("wall_s") and "error" not in n_ours and "error" not in n_theirs:
        g["n_wall_ratio"] = n_theirs["wall_s"] / n_ours["wall_s"]
    return g


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def render(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [f"machine {res['machine']}",
             (f"model {res['model']}  threads {c['threads']}  {c['clients']} clients x {c['requests']} streaming "
              f"requests x {c['max_tokens']} tokens, temperature {c['temperature']}")]
    if "raw" in res:
        r = res["raw"]
        lines.append(f"raw llama.cpp forked greedy decode: 1 seq {r['one_tok_s']:.1f} tok/s, {r['n_seq']} seq "
                     f"{r['many_tok_s']:.1f} tok/s -> batching gain {r['gain']:.2f}x")
    lines.append(f"{'server':<20} {'done':>7} {'tokens':>7} {'tok/req':>7} {'wall s':>7} {'tok/s':>7} "
                 f"{'TTFT p50':>9} {'TTFT p95':>9}")
    for name, s in res["servers"].items():
        if "error" in s:
            lines.append(f"{name:<20} FAILED: {s['error'].splitlines()[0]}")
            continue
        st = s["streams"]
        lines.append(f"{s['name']:<20} {st['completed']:>3}/{st['requests']:<3} {st['tokens']:>7} "
                     f"{st['tokens_per_request_mean']:>7.1f} {st['wall_s']:>7.1f} {st['tok_s']:>7.1f} "
                     f"{_f(st['ttft_p50_s'], '{:.3f}'):>8}s {_f(st['ttft_p95_s'], '{:.3f}'):>8}s"
                     + ("" if st["tokens_from"] == ["usage"] else f"  (tokens from {'/'.join(st['tokens_from'])})"))
        for e in st["errors"][:3]:
            lines.append(f"    error: {e}")
    for name in ("edge-adapt", "llama-cpp"):
        n = res["servers"].get(name, {}).get("n")
        if n:
            lines.append(f"{name + ' ' + n.get('mode', ''):<42} " + (
                f"FAILED: {n['error']}" if "error" in n else
                f"{n['choices']} choices {n['tokens']} tokens in {n['wall_s']:.1f} s -> {n['tok_s']:.1f} tok/s"))
    g = res["goals"]
    if "throughput_ratio" in g:
        goal = f" (goal >= 0.9 x raw gain = {g['throughput_goal']:.2f}: {'met' if g['throughput_met'] else 'NOT met'})" \
            if "throughput_goal" in g else ""
        lines.append(f"throughput ratio edge-adapt / llama_cpp.server {g['throughput_ratio']:.2f}x{goal}")
    if "ttft_ratio" in g:
        lines.append(f"TTFT p50 ratio edge-adapt / llama_cpp.server {g['ttft_ratio']:.3f} "
                     f"(goal <= 0.25: {'met' if g['ttft_met'] else 'NOT met'})")
    if "cpp_ratio" in g:
        lines.append(f"throughput ratio edge-adapt / llama-server (C++) {g['cpp_ratio']:.2f}x "
                     f"(goal >= 0.8: {'met' if g['cpp_met'] else 'NOT met'})")
    if "n_wall_ratio" in g:
        lines.append(f"n={c['n']}: one edge-adapt request is {g['n_wall_ratio']:.2f}x faster than "
                     f"{c['n']} sequential llama_cpp.server requests")
    m = res["servers"].get("edge-adapt", {}).get("metrics_streams")
    if m and m.get("edge_adapt_decode_steps_total"):
        steps = m["edge_adapt_decode_steps_total"]
        seqs = m.get("edge_adapt_decode_step_sequences_total", 0.0)
        lines.append(f"edge-adapt /metrics over the streaming phase: {steps:.0f} decode steps, {seqs / steps:.2f} "
                     f"sequences per step on average (max {m.get('edge_adapt_max_step_sequences', float('nan')):.0f} "
                     f"since start), {m.get('edge_adapt_prefix_cache_hits_total', 0):.0f} prefix-cache hits")
    return "\n".join(lines)


class HardLimit(BaseException):
    """The run's wall-clock bound passed (a BaseException: no per-server `except Exception` swallows it)."""


@contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise HardLimit in the main thread after `seconds`; servers are stopped by their finally blocks."""
    def expire(signum: int, frame: Any) -> None:
        raise HardLimit(f"--max-seconds {seconds:.0f} reached")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def parse_args(argv: list[str] | None = None) -> tuple[ServeBenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m edge_adapt.bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="GGUF (default: the embedded default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (and sequences for the raw gain)")
    p.add_argument("-R", "--requests", type=int, default=3, help="streaming requests per client")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1, help="request i gets seed + i")
    p.add_argument("-n", type=int, default=8, help="n for the one-request vs sequential comparison")
    p.add_argument("--parallel", type=int, default=8, help="edge-adapt serve --parallel")
    p.add_argument("--ctx", type=int, default=512, help="edge-adapt serve --ctx (tokens per sequence)")
    p.add_argument("--llama-cpp-ctx", type=int, default=2048, help="llama_cpp.server --n_ctx")
    p.add_argument("--llama-cpp-interrupt", action="store_true",
                   help="leave llama_cpp.server's interrupt_requests on (a new request ends the running stream)")
    p.add_argument("--servers", default="edge-adapt,llama-cpp",
                   help="comma list of edge-adapt, llama-cpp, cpp (cpp needs --llama-server)")
    p.add_argument("--edge-url", help="use this running edge-adapt serve instead of starting one")
    p.add_argument("--edge-extra-body", help='JSON added to every edge-adapt request, e.g. \'{"edge_adapt": {...}}\'')
    p.add_argument("--llama-server", type=Path, help="llama.cpp's C++ llama-server binary (adds cpp to --servers)")
    p.add_argument("--llama-server-args", default="", help="extra arguments for it, one string")
    p.add_argument("--no-raw", action="store_true", help="skip the raw llama.cpp batching gain")
    p.add_argument("--raw-repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="hard bound on the whole run")
    p.add_argument("--json", type=Path, help="write the full report here")
    a = p.parse_args(argv)
    names = tuple(x.strip() for x in a.servers.split(",") if x.strip())
    if a.llama_server and "cpp" not in names:
        names += ("cpp",)
    cfg = ServeBenchConfig(model=a.model, threads=a.threads, clients=a.clients, requests=a.requests,
                           max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed, n=a.n,
                           parallel=a.parallel, ctx=a.ctx, llama_cpp_ctx=a.llama_cpp_ctx,
                           llama_cpp_interrupt=a.llama_cpp_interrupt, servers=names, edge_url=a.edge_url,
                           edge_extra_body=a.edge_extra_body, llama_server=a.llama_server,
                           llama_server_args=tuple(a.llama_server_args.split()), raw=not a.no_raw,
                           raw_repeats=a.raw_repeats, timeout=a.timeout)
    return cfg, a


def main(argv: list[str] | None = None) -> None:
    import sys

    cfg, a = parse_args(argv)
    res: dict[str, Any] = {}
    try:
        with hard_limit(a.max_seconds):
            run_all(cfg, log=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True),
                    res=res)
    except HardLimit as exc:
        res["stopped"] = str(exc)
        res["goals"] = goals(res) if "servers" in res else {}
        print(f"stopped: {exc}", file=sys.stderr)
    if "servers" not in res:
        raise SystemExit(1)
    print(render(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"report written to {a.json}")
    if "stopped" in res:
        print(f"STOPPED: {res['stopped']}; the numbers above are partial")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
