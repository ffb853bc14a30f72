"""Side-by-side engine measurements on one machine in one run; each line reports a ratio.

- single stream: this engine vs `llama_cpp.Llama.create_completion`, same prompt, greedy, same token count;
- 16 samples x 128 tokens forked from one prompt and batched vs the same 16 run one after another;
- cost of a fork: `seq_cp` (split and unified KV) vs `Llama.save_state` + `load_state`;
- peak RSS of a fresh process vs the planner's prediction made before loading;
- the engine's forked greedy decode vs raw llama.cpp's (low-level API, no engine) at 1, 16 and 64 sequences:
  the gap to what the hardware gives, one number per size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_adapt.engine import Done, Engine, EngineOptions, Finished, SampleStarted, SamplingParams, Token
from edge_adapt.engine.handles import llama_like_the_engine
from edge_adapt.errors import EdgeAdaptError, EngineError, UsageError

PROMPT = "Write a long story about a lighthouse keeper and a storm."


@dataclass(frozen=True)
class BenchConfig:
    model: Path | None = None
    threads: int | None = None
    device: str = "cpu"
    samples: int = 16
    tokens: int = 128
    repeats: int = 3  # each timing is the best of this many runs: the machine is shared and noisy


def _best(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _trained_ctx(cfg: BenchConfig) -> int:
    """The context the model was trained for (0: its GGUF does not say)."""
    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.gguf_file import inspect_gguf

    return inspect_gguf(cfg.model or default_model_path()).n_ctx_train


def _check_ctx(trained: int, ctx: int, what: str, remedy: str) -> None:
    """Refuse in bench's terms a context per sequence the model was not trained for (`trained`: _trained_ctx):
    the engine's own refusal names run's --ctx, which bench does not have."""
    if ctx > trained > 0:
        raise UsageError(f"{what} needs a context of {ctx} tokens per sequence, more than the model's training "
                         f"context of {trained}: {remedy}")


def _ctx_for(cfg: BenchConfig) -> int:
    """A context per sequence that holds the prompt (under 64 tokens) and --tokens more, in 256s."""
    ctx = -(-(64 + cfg.tokens) // 256) * 256 + 256
    trained = _trained_ctx(cfg)
    most = (trained // 256 - 1) * 256 - 64  # the most --tokens whose context the model was trained for
    _check_ctx(trained, ctx, f"--tokens {cfg.tokens}", f"use --tokens {most} or fewer" if most >= 8
               else "single_stream and batched cannot run on this model (leave them out with --only)")
    return ctx


def _opts(cfg: BenchConfig, **kw: Any) -> EngineOptions:
    return EngineOptions(model=cfg.model, threads=cfg.threads, device=cfg.device, **kw)  # type: ignore[arg-type]


def single_stream(cfg: BenchConfig) -> dict[str, float]:
    """Greedy tokens/s for one sequence, prompt included, ours vs llama-cpp-python's high-level API."""
    from llama_cpp import Llama

    params = SamplingParams(temperature=0.0, ignore_eos=True)
    ctx = _ctx_for(cfg)
    with Engine(_opts(cfg, parallel=1, ctx=ctx)) as e:
        prompt = e.tokenize(e.chat_prompt([{"role": "user", "content": PROMPT}]))
        path, threads, gpu_layers = e.model_path, e.threads, e.gpu_layers

        def ours() -> None:
            for _ in e.generate(prompt, params, max_tokens=cfg.tokens):
                pass

        ours()  # warm-up: first decode allocates the graph
        t_ours = _best(ours, cfg.repeats)
    with llama_like_the_engine():
        llm = Llama(str(path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                    n_gpu_layers=gpu_layers, verbose=False)
    try:
        def theirs() -> None:
            llm.reset()  # no prefix reuse between repeats: both sides decode the prompt each time
            out = llm.create_completion(prompt, max_tokens=cfg.tokens, temperature=0.0, top_k=1, logit_bias={
                t: -1e9 for t in (llm.token_eos(),)})
            assert out["usage"]["completion_tokens"] == cfg.tokens, out["usage"]

        theirs()
        t_theirs = _best(theirs, cfg.repeats)
    finally:
        llm.close()
    return {"ours_tok_s": cfg.tokens / t_ours, "llama_cpp_tok_s": cfg.tokens / t_theirs, "ratio": t_theirs / t_ours}


def batched_vs_sequential(cfg: BenchConfig) -> dict[str, float]:
    """Aggregate tokens/s of N forked samples in one batch vs the same N samples one after another."""
    n, tokens = cfg.samples, cfg.tokens
    base = SamplingParams(temperature=0.8, seed=1, ignore_eos=True)
    with Engine(_opts(cfg, parallel=n, ctx=_ctx_for(cfg))) as e:
        prompt = e.tokenize(e.chat_prompt([{"role": "user", "content": PROMPT}]))

        def batched() -> None:
            done = [x for x in e.generate(prompt, base, n=n, max_tokens=tokens) if isinstance(x, Finished)]
            assert sum(d.n_tokens for d in done) == n * tokens

        def sequential() -> None:
            for i in range(n):
                p = SamplingParams(**{**base.__dict__, "seed": base.seed + i})
                for _ in e.generate(prompt, p, max_tokens=tokens):
                    pass

        batched()  # warm-up: first decode allocates the graph
        t_b = _best(batched, cfg.repeats)
        t_s = _best(sequential, cfg.repeats)
    total = n * tokens
    return {"batched_tok_s": total / t_b, "sequential_tok_s": total / t_s, "ratio": t_s / t_b,
            "batched_s": t_b, "sequential_s": t_s}


def fork_cost(cfg: BenchConfig, prompt_tokens: int = 256, reps: int = 20) -> dict[str, float]:
    """Seconds to branch a decoded prompt and decode one token on the branch.

    llama.cpp defers a cross-stream `seq_cp` (split KV) to the next decode, so every side is timed with the
    first decode after the copy included: fork + decode vs `Llama.load_state(saved)` + eval of one token.
    """
    from llama_cpp import Llama

    out: dict[str, float] = {}
    _check_ctx(_trained_ctx(cfg), 512, f"the fork section (a {prompt_tokens}-token prompt)", "it cannot run on this model "
               "(leave it out with --only)")
    for unified in (False, True):
        with Engine(_opts(cfg, parallel=2, ctx=512, kv_unified=unified)) as e:
            # any ids will do, as long as they are the model's: a small vocabulary wraps them around
            prompt = [(1000 + i) % e.model.n_vocab for i in range(prompt_tokens)]
            root = e.open(prompt)

            def fork() -> None:
                for _ in range(reps):
                    child = e.fork(root)
                    e.extend([(child, [42])])
                    e.release(child)

            fork()
            out["seq_cp_unified_s" if unified else "seq_cp_split_s"] = _best(fork, cfg.repeats) / reps
            path, threads, gpu_layers = e.model_path, e.threads, e.gpu_layers
    with llama_like_the_engine():
        llm = Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, n_gpu_layers=gpu_layers,
                    verbose=False)
    try:
        llm.eval(prompt)
        saved = llm.save_state()

        def save_load() -> None:
            for _ in range(reps):
                llm.load_state(llm.save_state())
                llm.eval([42])
                llm.load_state(saved)

        out["llama_save_load_s"] = _best(save_load, cfg.repeats) / reps
    finally:
        llm.close()
    out["ratio_split"] = out["llama_save_load_s"] / out["seq_cp_split_s"]
    out["ratio_unified"] = out["llama_save_load_s"] / out["seq_cp_unified_s"]
    return out


def _rss_child(model: str | None, parallel: int, ctx: int, tokens: int, threads: int | None, device: str) -> dict[str, Any]:
    """Runs in a fresh process: plan, load, generate with every sequence, report peak RSS."""
    from edge_adapt.engine.budget import peak_rss, plan
    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.gguf_file import inspect_gguf

    path = Path(model) if model else default_model_path()
    try:
        predicted = plan(inspect_gguf(path), parallel=parallel, ctx=ctx)
        with Engine(model=path, parallel=parallel, ctx=ctx, threads=threads, device=device) as e:
            prompt = e.tokenize(e.chat_prompt([{"role": "user", "content": PROMPT}]))
            for _ in e.generate(prompt, SamplingParams(temperature=0.8, ignore_eos=True), n=parallel,
                                max_tokens=tokens):
                pass
    except EdgeAdaptError as exc:  # the message alone, as the parent's one line gives stderr's last line
        raise SystemExit(str(exc)) from None
    return {"parallel": parallel, "ctx": ctx, "predicted_mib": predicted.total / 2**20,
            "peak_rss_mib": peak_rss() / 2**20}


def check_config(cfg: BenchConfig) -> None:
    """Refuse, before anything runs, a model or device that every section would fail on: in one line, where the
    peak-RSS section's children would report it as the last line of a traceback."""
    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.device import gpu_layers_for
    from edge_adapt.engine.gguf_file import inspect_gguf

    gpu_layers_for(cfg.device, None)  # type: ignore[arg-type]
    inspect_gguf(cfg.model or default_model_path())


def rss_vs_plan(cfg: BenchConfig) -> list[dict[str, float]]:
    rows = []
    trained = _trained_ctx(cfg)
    for parallel, ctx in ((1, 2048), (cfg.samples, 512), (32, 1024)):
        _check_ctx(trained, ctx, f"the rss section's {parallel} x {ctx} run", "it cannot run on this model "
                   "(leave it out with --only)")
        code = ("import json,sys; from edge_adapt.bench.engine import _rss_child; "
                f"print(json.dumps(_rss_child({str(cfg.model) if cfg.model else None!r}, {parallel}, {ctx}, "
                f"{min(cfg.tokens, 64)}, {cfg.threads!r}, {cfg.device!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit status {out.returncode}"
            raise EngineError(f"the peak RSS run of {parallel} x {ctx} tokens failed: {last}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["ratio"] = row["peak_rss_mib"] / row["predicted_mib"]
        rows.append(row)
    return rows


def _prompt_tokens(cfg: BenchConfig) -> list[int]:
    """PROMPT in the model's chat template, tokenized as bench.raw tokenizes it (special tokens parsed)."""
    with Engine(_opts(cfg, parallel=1, ctx=64)) as probe:
        return probe.tokenize(probe.chat_prompt([{"role": "user", "content": PROMPT}]), special=True)


def _ragged_tok_s(e: Engine, prompt: list[int], lengths: list[int]) -> float:
    """Greedy tokens/s of forks that stop after `lengths` tokens, dealt in a shuffled order, so that sequences
    end between the ids of sequences still running, as samples that stop early do."""
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    with e.opened(prompt) as root:
        samples = e.start(root, [params] * len(lengths), max_tokens=max(lengths), consume_root=True)
        for s, i in zip(samples, np.random.default_rng(0).permutation(len(lengths))):
            s.max_tokens = lengths[i]
        t0 = time.perf_counter()
        for _ in e.advance(samples):
            pass
        return sum(lengths) / (time.perf_counter() - t0)


def engine_vs_raw(cfg: BenchConfig, sizes: tuple[int, ...] = (1, 16, 64), ragged: int = 16) -> list[dict[str, Any]]:
    """Greedy tokens/s of N forks of one prompt: the engine (`generate`: sampling, log-probabilities, text,
    events) against raw llama.cpp (`bench.raw`: argmax and one `llama_decode` per step, nothing else) on the
    same model handle, the same context per sequence and threads, timed alternately, best of `repeats`.

    The `ragged` row: forks stop at different lengths (bench.raw.ragged_lengths), in the middle of the ids on the
    engine's side and always from the highest id down on raw's, where the live ids stay consecutive: the engine
    has to move sequences (Engine._pack) to decode as few micro-batches as raw does."""
    from edge_adapt.bench.raw import forked_greedy_tok_s, ragged_lengths

    tokens = min(cfg.tokens, 64)  # 64 sequences x 128 tokens would take minutes on 2 cores
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    prompt = _prompt_tokens(cfg)
    rows: list[dict[str, Any]] = []
    for n, is_ragged in [*((n, False) for n in sizes), *(((ragged, True),) if ragged else ())]:
        ctx = len(prompt) + tokens + 16  # what bench.raw gives each of its sequences
        lengths = ragged_lengths(n, tokens) if is_ragged else None
        with Engine(_opts(cfg, parallel=max(n, 2), ctx=ctx)) as e:
            def ours() -> float:
                if lengths:
                    return _ragged_tok_s(e, prompt, lengths)
                t0, count = 0.0, 0
                for ev in e.generate(prompt, [params] * n, max_tokens=tokens):
                    if isinstance(ev, SampleStarted):
                        t0 = time.perf_counter()  # the prompt decoded and forked, nothing sampled: as the raw loop
                    elif isinstance(ev, Token):
                        count += 1
                return count / (time.perf_counter() - t0)

            engine_tok_s = raw_tok_s = 0.0
            moves = e.moves
            for _ in range(cfg.repeats):
                engine_tok_s = max(engine_tok_s, ours())
                raw_tok_s = max(raw_tok_s, forked_greedy_tok_s(e.model, prompt, n, tokens, e.threads, lengths,
                                                               offload_kqv=e.gpu_layers > 0))
        rows.append({"sequences": n, "ragged": is_ragged, "tokens": tokens, "engine_tok_s": engine_tok_s,
                     "raw_tok_s": raw_tok_s, "ratio": engine_tok_s / raw_tok_s,
                     "moves_per_run": (e.moves - moves) / cfg.repeats})
    return rows


@contextmanager
def _timed(owner: Any, name: str, spent: dict[str, float], label: str, main_only: bool = False) -> Iterator[None]:
    """While it lasts, `owner.name` adds the seconds of each call to spent[label] (`main_only`: the calls made on
    the main thread, those a step waits for)."""
    fn = getattr(owner, name)
    lock = threading.Lock()  # the log-probabilities' workers add up at once

    def timed(*args: Any, **kwargs: Any) -> Any:
        if main_only and threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, fn)


def step_profile(cfg: BenchConfig, sizes: tuple[int, ...] = (1, 16, 64), sampled: int = 16) -> list[dict[str, Any]]:
    """Where a greedy step of N forks goes, in ms per step (best of `repeats`): llama_decode, copying the logits
    out (in line, or on the workers while the step samples: then what the step waited for it counts), choosing
    the tokens, their log-probabilities (in line, or on the workers during the decode, where they cost the step
    nothing), and the rest (masks, text, events). One more row samples `sampled` forks at temperature 0.8
    (top-k 40, top-p 0.95, min-p 0.05), as users do."""
    import edge_adapt.engine.engine as engine_module
    import edge_adapt.engine.steps as steps_module
    from edge_adapt.engine.outputs import Outputs

    tokens = min(cfg.tokens, 64)
    prompt = _prompt_tokens(cfg)
    rows = []
    for n, temperature in [*((n, 0.0) for n in sizes), *(((sampled, 0.8),) if sampled else ())]:
        params = [SamplingParams(temperature=temperature, seed=i, ignore_eos=True) for i in range(n)]
        with Engine(_opts(cfg, parallel=max(n, 2), ctx=len(prompt) + tokens + 16)) as e:
            best: dict[str, Any] = {}
            for run in range(cfg.repeats + 1):  # the first run warms up, and is not counted
                spent: dict[str, float] = {}
                with (_timed(e.ctx, "decode", spent, "decode"), _timed(Outputs, "_copy_rows", spent, "logits_copy"),
                      _timed(Outputs, "wait", spent, "logits_wait", main_only=True),
                      _timed(steps_module, "sample_rows", spent, "sampling"),
                      _timed(engine_module, "token_logprobs", spent, "logprobs")):
                    t0 = 0.0
                    for ev in e.generate(prompt, params, max_tokens=tokens):
                        if isinstance(ev, SampleStarted):
                            spent.clear()  # from the forked prompt, as engine_vs_raw
                            t0 = time.perf_counter()
                    wall = time.perf_counter() - t0
                row = {"logits_copy": 0.0, "logits_wait": 0.0, **{k: v / tokens * 1e3 for k, v in spent.items()}}
                beside = e._beside is not None
                row["step"] = wall / tokens * 1e3
                # beside the step: the log-probabilities and the copy (what the step waited for it is logits_wait)
                row["rest"] = row["step"] - sum(v for k, v in row.items() if k not in (
                    "step", *(("logprobs", "logits_copy") if beside else ("logits_wait",))))
                if run and (not best or row["step"] < best["step"]):
                    best = {"sequences": n, "temperature": temperature, "logprobs_beside": beside,
                            "logprobs_workers": e._beside_workers if beside else 0, **row}
            rows.append(best)
    return rows


def clients_vs_forks(cfg: BenchConfig, n: int = 16, temperatures: tuple[float, ...] = (0.0, 0.8)) -> list[dict[str, Any]]:
    """Tokens/s of `n` requests of one sample each through the server's scheduler (`edge-adapt serve`'s clients)
    against one request of `n` forks, the same samples (seed i for sample i, so the same tokens), alternately on
    one engine, best of `repeats`, from the first token to the last: what separate requests cost beyond the
    decode they share (their own sampling calls, log-probabilities, text and events)."""
    from edge_adapt.server.scheduler import Job, Scheduler

    tokens = min(cfg.tokens, 64)
    prompt = _prompt_tokens(cfg)
    rows = []
    with Engine(_opts(cfg, parallel=n + 1, ctx=len(prompt) + tokens + 16)) as e:
        sched = Scheduler(e, max_queue=n, prefix_cache=False)
        sched.start()
        try:
            def tok_s(jobs: list[Job]) -> float:
                first, count, ended = 0.0, 0, 0
                failed: list[BaseException] = []
                done = threading.Event()

                def sink(ev: object) -> None:  # on the scheduler's thread: no consumer thread takes the GIL
                    nonlocal first, count, ended
                    if isinstance(ev, Token):
                        count += 1
                        first = first or time.perf_counter()
                    elif isinstance(ev, (Done, BaseException)):
                        if isinstance(ev, BaseException):
                            failed.append(ev)
                        ended += 1
                        if ended == len(jobs):
                            done.set()

                with sched._cond:  # admitted at the same step
                    for job in jobs:
                        sched.submit(job, sink)
                if not done.wait(600) or failed:
                    raise EngineError(f"the clients benchmark did not finish: {failed or 'timed out'}")
                return count / (time.perf_counter() - first)

            for temperature in temperatures:
                samples = [SamplingParams(temperature=temperature, seed=i, ignore_eos=True) for i in range(n)]
                forks = clients = 0.0
                for _ in range(cfg.repeats):
                    forks = max(forks, tok_s([Job(prompt, max_tokens=tokens, samples=tuple(samples))]))
                    clients = max(clients, tok_s([Job(prompt, max_tokens=tokens, samples=(p,)) for p in samples]))
                rows.append({"requests": n, "temperature": temperature, "tokens": tokens, "forks_tok_s": forks,
                             "clients_tok_s": clients, "ratio": clients / forks})
        finally:
            sched.close()
    return rows


# `edge-adapt bench`'s engine sections, in the order they run (edge_adapt.bench adds the strategies one).
SECTIONS = {"single_stream": single_stream, "batched": batched_vs_sequential, "fork": fork_cost, "rss": rss_vs_plan,
            "raw": engine_vs_raw, "profile": step_profile, "clients": clients_vs_forks}


def config_json(cfg: BenchConfig) -> dict[str, Any]:
    """The settings a run's results were measured with, as JSON keeps them: numbers as numbers, no model as null."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def render(results: dict[str, Any]) -> str:
    lines = []
    if "single_stream" in results:
        r = results["single_stream"]
        lines.append(f"single stream   ours {r['ours_tok_s']:.1f} tok/s vs Llama.create_completion "
                     f"{r['llama_cpp_tok_s']:.1f} tok/s -> {r['ratio']:.2f}x  (goal >= 1.0x)")
    if "batched" in results:
        r = results["batched"]
        lines.append(f"forked batch    {r['batched_tok_s']:.1f} tok/s aggregate vs {r['sequential_tok_s']:.1f} tok/s "
                     f"one after another -> {r['ratio']:.2f}x  (goal >= 2.0x)")
    if "fork" in results:
        r = results["fork"]
        lines.append(f"fork + 1 decode seq_cp split {r['seq_cp_split_s'] * 1e3:.1f} ms, unified "
                     f"{r['seq_cp_unified_s'] * 1e3:.1f} ms vs Llama save/load_state {r['llama_save_load_s'] * 1e3:.1f} ms"
                     f" -> {r['ratio_split']:.1f}x / {r['ratio_unified']:.1f}x faster")
    for r in results.get("raw", []):
        kind = f"{r['sequences']:>2} forks" + (f" ragged ({r['moves_per_run']:.0f} moves)" if r.get("ragged") else "")
        lines.append(f"vs raw llama.cpp {kind}: engine {r['engine_tok_s']:.1f} tok/s, raw "
                     f"{r['raw_tok_s']:.1f} tok/s -> {r['ratio']:.2f}  (goal >= 0.95 at 16 and 64)")
    for r in results.get("profile", []):
        where = f" (beside the decode, {r['logprobs_workers']} threads, their sum)" if r["logprobs_beside"] else ""
        kind = f"{r['sequences']:>2} forks" + (f" T={r['temperature']:g}" if r.get("temperature") else "")
        copy = (f"logits copy waited for {r['logits_wait']:.2f} (copying took {r['logits_copy']:.2f} in all threads)"
                if r["logprobs_beside"] else f"logits copy {r['logits_copy']:.2f}")
        lines.append(f"step profile {kind}: {r['step']:.2f} ms = llama_decode {r['decode']:.2f}, {copy}, "
                     f"sampling {r['sampling']:.2f}, log-probs {r['logprobs']:.2f}{where}, rest {r['rest']:.2f}")
    for r in results.get("clients", []):
        lines.append(f"{r['requests']} requests of 1 vs 1 of {r['requests']} at T={r['temperature']:g}: "
                     f"{r['clients_tok_s']:.1f} vs {r['forks_tok_s']:.1f} tok/s -> {r['ratio']:.2f}  "
                     f"(1.00: separate requests cost nothing beyond the decode they share)")
    for r in results.get("rss", []):
        lines.append(f"peak RSS        {r['parallel']:>2} x {r['ctx']:<5} measured {r['peak_rss_mib']:.0f} MiB vs planned "
                     f"{r['predicted_mib']:.0f} MiB -> {r['ratio']:.3f}  (goal within 15%)")
    return "\n".join(lines)
