"""The `edge-adapt` command line: parse options, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.exceptions import TyperException

from edge_adapt import interrupts
from edge_adapt.errors import EdgeAdaptError, UsageError, validated

app = typer.Typer(
    help="Adaptive inference-time compute for small local models on llama.cpp.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_debug = False

# -- shared options -----------------------------------------------------------------------------------------
ModelArg = Annotated[Optional[Path], typer.Argument(help="GGUF model (default: embedded SmolLM2-135M-Instruct)")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF model (default: embedded SmolLM2-135M-Instruct)")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", help="context length per sequence (tokens)", min=64)]


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    metal = "metal"


DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="where to run")]
GpuLayersOpt = Annotated[Optional[int], typer.Option("--gpu-layers", help="layers to offload to the GPU (-1: all)", min=-1)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: physical cores)", min=1)]
BudgetOpt = Annotated[Optional[str], typer.Option("--mem-budget", help="refuse plans above this much memory, e.g. 1.5GB")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="show llama.cpp's own log")]
TempOpt = Annotated[float, typer.Option("--temp", help="sampling temperature (0: greedy)", min=0.0)]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", help="most tokens to generate per sample", min=1)]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed (sample i uses seed + i)")]
SuiteOpt = Annotated[str, typer.Option("--suite", help="arith, gsm8k, or a user suite .jsonl file")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="suite file (gsm8k: the shared training split by default)")]
ScorerOpt = Annotated[Optional[str], typer.Option("--scorer", help="final-number | exact | regex:PATTERN | module:function")]
PoolKOpt = Annotated[int, typer.Option("-k", "--samples", help="samples per prompt in the pool", min=1, max=64)]
PoolTempOpt = Annotated[float, typer.Option("--temp", help="sampling temperature of the pool")]
PrunePointsOpt = Annotated[Optional[list[int]], typer.Option("--prune-at", help="token counts where scores are recorded (repeatable)")]
CacheOpt = Annotated[Path, typer.Option("--cache", help="sample pool cache (resumable; shared by eval and label)")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="keep the k most likely tokens (0: off)", min=0)]
TopPOpt = Annotated[float, typer.Option("--top-p", help="nucleus sampling mass", min=0.0, max=1.0)]
MinPOpt = Annotated[float, typer.Option("--min-p", help="drop tokens below min-p x the top probability", min=0.0, max=1.0)]
RepeatOpt = Annotated[float, typer.Option("--repeat-penalty", help="penalty for recently seen tokens (1: off)", min=0.0)]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for unexpected errors")] = False) -> None:
    global _debug
    _debug = debug


def _text_arg(value: str, what: str) -> str:
    """Command-line text must be UTF-8: Python hands undecodable bytes through as lone surrogates."""
    if value == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{what} on standard input is not valid UTF-8 (byte {exc.start})") from None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8") from None
    return value


def _engine(model: Path | None, *, parallel: int, ctx: int, device: DeviceChoice, gpu_layers: int | None,
            threads: int | None, mem_budget: str | None, verbose: bool) -> Any:
    """Plan against the budget from metadata alone, then load."""
    from edge_adapt.engine import Engine, EngineOptions
    from edge_adapt.engine.budget import fit, parse_size
    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.gguf_file import inspect_gguf

    path = model or default_model_path()
    if mem_budget is not None:
        fit(inspect_gguf(path), parse_size(mem_budget), ctx=ctx, want=parallel)
    return Engine(EngineOptions(model=path, parallel=parallel, ctx=ctx, device=device.value, gpu_layers=gpu_layers,  # type: ignore[arg-type]
                                threads=threads, verbose=verbose))


@contextmanager
def _ctrl_c_cancels(engine: Any, *, then_exit: bool = True) -> Iterator[None]:
    """While generating, Ctrl-C stops the reply (the engine ends it cleanly); then the command ends as
    interrupted (exit 130), or with `then_exit=False` (chat) carries on."""
    hit: list[int] = []

    def on_sigint(*_: Any) -> None:
        hit.append(1)
        engine.cancel()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit and then_exit:
        raise KeyboardInterrupt


def _ctx_for(prompt_tokens: int, max_tokens: int, ctx: int | None) -> int:
    # Enough for prompt + reply, rounded up as llama.cpp rounds a sequence's cells.
    return ctx or max(256, -(-(prompt_tokens + max_tokens + 64) // 256) * 256)


StrategyOpt = Annotated[Optional[str], typer.Option("--strategy", "-s", help="single | best-of-n | adaptive | prune | adaptive+prune | vote | weighted-vote | weighted-best-of-n | beam | lookahead | revise | auto")]
BudgetNOpt = Annotated[Optional[int], typer.Option("--budget", help="most samples the strategy may draw", min=1)]
ThresholdOpt = Annotated[Optional[float], typer.Option("--threshold", help="adaptive: stop when a sample's p_keep reaches this")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="strategy TOML/JSON file (flags override it)")]
PolicyOpt = Annotated[Optional[Path], typer.Option("--policy", help="auto: compute-optimal policy JSON (default: the one shipped for the default model)")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="self-eval adapter GGUF (LoRA / aLoRA), on only while scoring; 'none': not even the default model's shipped one")]


def _no_adapter(adapter: Path | None) -> bool:
    return adapter is not None and str(adapter).lower() == "none"


def _strategy_config(path: Path | None, *, adapter: Path | None = None, **flags: Any) -> Any:
    from edge_adapt.selfeval import SelfEvalConfig
    from edge_adapt.strategies import StrategyConfig

    cfg = StrategyConfig.from_file(path, **flags) if path else StrategyConfig.parse(
        {k: v for k, v in flags.items() if v is not None})
    if adapter is not None:
        update: dict[str, Any] = {"default_adapter": False} if _no_adapter(adapter) else {"adapter": adapter}
        cfg = cfg.model_copy(update={"self_eval": (cfg.self_eval or SelfEvalConfig()).model_copy(update=update)})
    return cfg


def _run_strategy(prompt: str, system: str | None, cfg: Any, *, show_scores: bool, as_json: bool, model: Path | None,
                  ctx: int | None, device: DeviceChoice, gpu_layers: int | None, threads: int | None,
                  mem_budget: str | None, verbose: bool) -> None:
    from edge_adapt.engine import Done, Finished, Token
    from edge_adapt.strategies import Chosen, Pruned, Scored, run_strategy, samples_at_once
    from edge_adapt.strategies.events import DifficultyEstimated
    from edge_adapt.strategies.registry import tokens_per_sequence

    guess = len(prompt.encode()) + len((system or "").encode()) + 64 + 64  # + the self-eval suffix
    span = tokens_per_sequence(cfg)
    engine = _engine(model, parallel=samples_at_once(cfg) + 1, ctx=_ctx_for(guess, span, ctx), device=device,
                     gpu_layers=gpu_layers, threads=threads, mem_budget=mem_budget, verbose=verbose)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    scores: dict[int, list[tuple[int, float]]] = {}
    finished: dict[int, Any] = {}
    chosen = usage = difficulty = None
    stream = cfg.strategy == "single" and not as_json and not show_scores
    with engine, _ctrl_c_cancels(engine):
        for ev in run_strategy(engine, messages, cfg):
            if isinstance(ev, Token) and stream:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, Scored):
                scores.setdefault(ev.sample, []).append((ev.n_tokens, ev.p_keep))
            elif isinstance(ev, Finished):
                finished[ev.sample] = ev
            elif isinstance(ev, Chosen):
                chosen = ev
            elif isinstance(ev, DifficultyEstimated):
                difficulty = ev
            elif isinstance(ev, Done):
                usage = ev.usage
    if stream:
        print()
        return
    if as_json:
        print(json.dumps({
            "strategy": cfg.strategy,
            "chosen": None if chosen is None else {"sample": chosen.sample, "text": chosen.text, "p_keep": chosen.p_keep,
                                                   "answer": chosen.answer, "votes": chosen.votes},
            "samples": [{"index": f.sample, "text": f.text, "finish_reason": f.reason, "tokens": f.n_tokens,
                         "scores": scores.get(f.sample, [])} for f in (finished[i] for i in sorted(finished))],
            "usage": None if usage is None else {k: v for k, v in usage.__dict__.items()},
        }, ensure_ascii=False, indent=2, default=str))
        return
    if show_scores:
        for i in sorted(finished):
            f = finished[i]
            trail = "  ".join(f"@{n}: {p:.3f}" for n, p in scores.get(i, []))
            mark = "*" if chosen is not None and chosen.sample == i else " "
            print(f"{mark} sample {i:>2}  {f.n_tokens:>4} tokens  {f.reason:<9} {trail}")
        if difficulty is not None:
            print(f"  difficulty bin {difficulty.bin} of 5 (probe p_keep {difficulty.p_keep:.3f}): {difficulty.choice}")
        if usage is not None:
            print(f"  compute: {usage.samples_started} samples ({usage.samples_pruned} pruned), {usage.generated_tokens} "
                  f"generated + {usage.selfeval_tokens} self-eval tokens, {usage.wall_s:.1f} s")
        print()
    if chosen is not None:
        print(chosen.text)


# -- run ----------------------------------------------------------------------------------------------------
@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="the prompt ('-' reads standard input)")],
    n: Annotated[int, typer.Option("-n", "--samples", help="samples to draw in parallel", min=1, max=255)] = 1,
    temp: TempOpt = 0.0,
    max_tokens: MaxTokOpt = 256,
    seed: SeedOpt = 0,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="stop string (repeatable)")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="plain completion: no chat template")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="system message")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print samples, token counts and timing as JSON")] = False,
    strategy: StrategyOpt = None,
    budget: BudgetNOpt = None,
    threshold: ThresholdOpt = None,
    config: ConfigOpt = None,
    adapter: AdapterOpt = None,
    policy: PolicyOpt = None,
    beam_width: Annotated[Optional[int], typer.Option("--beam-width", help="beam/lookahead: M, expansions per kept beam", min=1)] = None,
    step_tokens: Annotated[Optional[int], typer.Option("--max-step-tokens", help="beam/lookahead: longest step", min=1)] = None,
    lookahead: Annotated[Optional[int], typer.Option("--lookahead", help="lookahead: greedy steps rolled out before scoring", min=1)] = None,
    sequential_ratio: Annotated[Optional[float], typer.Option("--sequential-ratio", help="revise: share of the budget spent on revisions", min=0, max=1)] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", "-k", help="prune: samples kept at each prune point", min=1)] = None,
    prune_at: Annotated[Optional[list[int]], typer.Option("--prune-at", help="prune: token count to score and prune at (repeatable)")] = None,
    show_scores: Annotated[bool, typer.Option("--show-scores", help="print every sample's self-eval score")] = False,
    model: ModelOpt = None,
    ctx: CtxOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    mem_budget: BudgetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Answer one prompt; with -n, draw several samples from one decoded prompt."""
    from edge_adapt.engine import Finished, SamplingParams, Token

    prompt = _text_arg(prompt, "the prompt")
    if system is not None:
        system = _text_arg(system, "--system")
    params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    if strategy or config:
        cfg = _strategy_config(config, strategy=strategy, budget=budget, threshold=threshold, adapter=adapter,
                               temperature=temp if temp > 0 else None, max_tokens=max_tokens, seed=seed,
                               stop=tuple(stop) if stop else None, k=keep,
                               prune_at=tuple(prune_at) if prune_at else None, policy=policy, beam_width=beam_width,
                               max_step_tokens=step_tokens, lookahead=lookahead, sequential_ratio=sequential_ratio)
        _run_strategy(prompt, system, cfg, show_scores=show_scores, as_json=as_json, model=model, ctx=ctx,
                      device=device, gpu_layers=gpu_layers, threads=threads, mem_budget=mem_budget, verbose=verbose)
        return
    t0 = time.perf_counter()
    # A BPE token covers at least one byte, so the prompt's bytes bound its tokens before anything is loaded;
    # 64 more cover the chat template. The engine re-checks with the exact count.
    guess = len(prompt.encode()) + len((system or "").encode()) + 64
    engine = _engine(model, parallel=n, ctx=_ctx_for(guess, max_tokens, ctx), device=device,
                     gpu_layers=gpu_layers, threads=threads, mem_budget=mem_budget, verbose=verbose)
    with engine:
        text = prompt if raw else engine.chat_prompt(
            ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}])
        tokens = engine.tokenize(text, add_bos=raw)
        t_load = time.perf_counter()
        done: dict[int, Finished] = {}
        first_token_at: float | None = None
        stream = n == 1 and not as_json
        with _ctrl_c_cancels(engine):
            for ev in engine.generate(tokens, params, n=n, max_tokens=max_tokens, stop=stop or ()):
                if isinstance(ev, Token):
                    first_token_at = first_token_at or time.perf_counter()
                    if stream:
                        sys.stdout.write(ev.text)
                        sys.stdout.flush()
                elif isinstance(ev, Finished):
                    done[ev.sample] = ev
        t_end = time.perf_counter()
    if stream:
        sys.stdout.write("\n")
        return
    samples = [done[i] for i in sorted(done)]
    if as_json:
        gen = sum(s.n_tokens for s in samples)
        print(json.dumps({
            "model": str(engine.model_path),
            "prompt_tokens": len(tokens),
            "samples": [{"index": s.sample, "text": s.text, "finish_reason": s.reason, "tokens": s.n_tokens,
                         "mean_logprob": s.sum_logprob / max(1, s.n_tokens)} for s in samples],
            "usage": {"prompt_tokens": len(tokens), "generated_tokens": gen},
            "timing": {"load_s": round(t_load - t0, 4), "first_token_s": round((first_token_at or t_end) - t_load, 4),
                       "generate_s": round(t_end - t_load, 4), "tokens_per_s": round(gen / max(t_end - t_load, 1e-9), 2)},
        }, ensure_ascii=False, indent=2))
        return
    for s in samples:
        print(f"--- sample {s.sample} ({s.n_tokens} tokens, {s.reason}) ---\n{s.text}")


# -- chat ---------------------------------------------------------------------------------------------------
CHAT_HELP = """commands:
  /reset        forget the conversation
  /save FILE    save the conversation and its KV cache (add --force to overwrite)
  /load FILE    restore a saved conversation
  /strategy NAME [BUDGET]  answer with a strategy (single, best-of-n, adaptive, prune, vote, ...)
  /help         this text
  /exit         leave (Ctrl-D too); Ctrl-C interrupts a reply"""


@app.command()
def chat(
    model: ModelArg = None,
    system: Annotated[Optional[str], typer.Option("--system", help="system message")] = None,
    temp: TempOpt = 0.7,
    max_tokens: MaxTokOpt = 512,
    seed: SeedOpt = 0,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatOpt = 1.1,
    ctx: CtxOpt = 4096,
    strategy: StrategyOpt = None,
    budget: BudgetNOpt = None,
    threshold: ThresholdOpt = None,
    config: ConfigOpt = None,
    adapter: AdapterOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    mem_budget: BudgetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Talk with a model; the KV cache is kept across turns so each turn decodes only what is new."""
    from edge_adapt.engine import SamplingParams, Token
    from edge_adapt.session import ChatSession, Notice
    from edge_adapt.strategies import Chosen, samples_at_once

    params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, seed=seed)
    cfg = _strategy_config(config, strategy=strategy, budget=budget, threshold=threshold, adapter=adapter,
                           temperature=temp) if (strategy or config) else None
    # The conversation's own sequence, plus room for the samples of the strategy chosen at start.
    parallel = 1 + (samples_at_once(cfg) if cfg is not None and cfg.strategy != "single" else 0)
    engine = _engine(model, parallel=parallel, ctx=ctx or 4096, device=device, gpu_layers=gpu_layers,
                     threads=threads, mem_budget=mem_budget, verbose=verbose)
    with engine:
        session = ChatSession(engine, system=_text_arg(system, "--system") if system else None, params=params,
                              max_tokens=max_tokens, strategy=cfg)
        print(f"edge-adapt chat: {engine.info.name} ({engine.n_ctx_seq} tokens of context). /help for commands.")
        while True:
            try:
                line = input("> ")
                line.encode("utf-8")  # undecodable bytes arrive as lone surrogates (or as a decode error)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            except (UnicodeDecodeError, UnicodeEncodeError):  # the line is dropped, the chat goes on
                print("error: this line is not valid UTF-8; it was ignored")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                try:
                    if cmd in ("/exit", "/quit"):
                        return
                    elif cmd == "/help":
                        print(CHAT_HELP)
                    elif cmd == "/reset":
                        session.reset()
                        print("(conversation cleared)")
                    elif cmd == "/save" and arg:
                        path, _, flag = arg.strip().partition(" ")
                        session.save(path, force=flag.strip() == "--force")
                        print(f"(saved to {path})")
                    elif cmd == "/strategy":
                        name, _, n = arg.strip().partition(" ")
                        base = session.strategy or _strategy_config(None, temperature=temp)
                        session.strategy = base.with_options(strategy=name or None,
                                                             budget=int(n) if n.strip().isdigit() else None)
                        room = engine.options.parallel - 1
                        print(f"(strategy {session.strategy.strategy}, budget {session.strategy.budget}; "
                              f"{room} parallel samples fit this chat, start it with --budget N for more)")
                    elif cmd == "/load" and arg:
                        session.load(arg.strip())
                        print(f"(restored {len(session.messages)} messages)")
                    else:
                        print(f"unknown command {line!r}; /help lists them")
                except EdgeAdaptError as exc:
                    print(f"error: {exc}")
                continue
            try:
                with _ctrl_c_cancels(engine, then_exit=False):
                    for ev in session.send(line):
                        if isinstance(ev, Notice):
                            print(f"({ev.text})")
                        elif isinstance(ev, Token) and (session.strategy is None or session.strategy.strategy == "single"):
                            sys.stdout.write(ev.text)
                            sys.stdout.flush()
                        elif isinstance(ev, Chosen):
                            score = f"p_keep {ev.p_keep:.2f}, " if ev.p_keep is not None else ""
                            sys.stdout.write(f"{ev.text}\n({score}sample {ev.sample})")
            except EdgeAdaptError as exc:
                print(f"error: {exc}")
                continue
            print()


# -- info ---------------------------------------------------------------------------------------------------
@app.command()
def info(
    model: ModelArg = None,
    mem_budget: BudgetOpt = None,
    ctx: Annotated[int, typer.Option("--ctx", help="context per sequence to plan for", min=64)] = 1024,
    parallel: Annotated[Optional[int], typer.Option("-n", "--parallel", help="sequences to plan for", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Describe a GGUF model and plan its memory (no weights are loaded)."""
    from edge_adapt.engine.budget import MiB, fit, parse_size, plan
    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.gguf_file import inspect_gguf

    meta = inspect_gguf(model or default_model_path())
    if mem_budget is not None:
        p = fit(meta, parse_size(mem_budget), ctx=ctx, want=parallel)
    else:
        p = plan(meta, parallel=parallel or 1, ctx=ctx)
    facts = {
        "file": str(meta.path), "name": meta.name, "architecture": meta.architecture,
        "parameters": meta.n_params, "quantization": meta.file_type, "tensor_types": meta.tensor_types,
        "layers": meta.n_layers, "embedding": meta.n_embd, "heads": meta.n_head, "kv_heads": meta.n_head_kv,
        "vocabulary": meta.n_vocab, "training_context": meta.n_ctx_train,
        "kv_bytes_per_token": meta.kv_bytes_per_token_f16, "chat_template": bool(meta.chat_template),
        "edge_adapt": meta.edge_adapt,
        "plan": {"parallel": p.parallel, "ctx": p.ctx, "total_bytes": p.total, "weights": p.weights, "kv": p.kv,
                 "compute": p.compute, "logits": p.outputs, "runtime": p.runtime},
    }
    if as_json:
        print(json.dumps(facts, indent=2, default=str))
        return
    print(f"{meta.name}  [{meta.path}]")
    print(f"  architecture   {meta.architecture}, {meta.n_params / 1e6:.1f}M parameters, {meta.file_type}"
          f" ({', '.join(f'{k}: {v}' for k, v in meta.tensor_types.items())})")
    print(f"  shape          {meta.n_layers} layers, {meta.n_embd} wide, {meta.n_head} heads / {meta.n_head_kv} KV heads,"
          f" vocabulary {meta.n_vocab}")
    print(f"  context        {meta.n_ctx_train} tokens trained; KV {meta.kv_bytes_per_token_f16 / 1024:.1f} KiB per token")
    print(f"  chat template  {'yes' if meta.chat_template else 'no (ChatML is used)'}")
    for k, v in meta.edge_adapt.items():
        print(f"  edge_adapt.{k} = {v}")
    budget = f" within {parse_size(mem_budget) / MiB:.0f} MiB" if mem_budget else ""
    print(f"  plan{budget}: {p.describe()}")


# -- bench --------------------------------------------------------------------------------------------------
@app.command()
def bench(
    only: Annotated[Optional[list[str]], typer.Option("--only", help="single_stream | batched | fork | rss | strategies (repeatable)")] = None,
    samples: Annotated[int, typer.Option("--samples", help="parallel samples for the batched run", min=2)] = 16,
    tokens: Annotated[int, typer.Option("--tokens", help="tokens per sample", min=8)] = 128,
    repeats: Annotated[int, typer.Option("--repeats", help="best of this many runs per timing", min=1)] = 3,
    model: ModelOpt = None,
    device: DeviceOpt = DeviceChoice.cpu,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure the engine against llama-cpp-python's high-level API, side by side, and print ratios."""
    from edge_adapt.bench import engine as engine_bench
    from edge_adapt.bench import strategies as strategy_bench

    known = {"single_stream", "batched", "fork", "rss", "strategies"}
    if only and not set(only) <= known:
        raise UsageError(f"--only takes {', '.join(sorted(known))}; got {', '.join(sorted(set(only) - known))}")
    sections = set(only) if only else known
    results: dict[str, Any] = {}
    if sections - {"strategies"}:
        results = engine_bench.run_all(engine_bench.BenchConfig(model=model, threads=threads, device=device.value,
                                                                samples=samples, tokens=tokens, repeats=repeats),
                                       sections - {"strategies"})
        if not as_json:
            print(engine_bench.render(results))
    if "strategies" in sections:
        from edge_adapt.engine import Engine

        with Engine(model=model, parallel=17, ctx=512, threads=threads, device=device.value) as e:
            results["strategies"] = strategy_bench.run_all(e, repeats=repeats)
        if not as_json:
            print(strategy_bench.render(results["strategies"]))
    if as_json:
        print(json.dumps(results, indent=2))


# -- eval ---------------------------------------------------------------------------------------------------
def _pool_fields(*, temp: float, prune_at: list[int] | None, adapter: Path | None, **flags: Any) -> dict[str, Any]:
    """The EvalConfig fields of a sample pool from the flags `eval` and `tune-policy` share."""
    fields = {**flags, "temperature": temp, "default_adapter": not _no_adapter(adapter),
              "adapter": None if _no_adapter(adapter) else adapter}
    if prune_at:
        fields["prune_points"] = prune_at
    return fields


@app.command("eval")
def eval_cmd(
    suite: SuiteOpt = "arith",
    split: Annotated[str, typer.Option("--split", help="arith split: train, validation or test")] = "test",
    data: DataOpt = None,
    scorer: ScorerOpt = None,
    n_prompts: Annotated[int, typer.Option("--prompts", help="prompts to evaluate", min=1)] = 200,
    k: PoolKOpt = 16,
    temp: PoolTempOpt = 0.7,
    max_tokens: MaxTokOpt = 96,
    prune_at: PrunePointsOpt = None,
    seed: SeedOpt = 0,
    live: Annotated[Optional[list[str]], typer.Option("--live", help="also run this strategy for real: best-of-8 | adaptive (repeatable)")] = None,
    live_prompts: Annotated[int, typer.Option("--live-prompts", min=1)] = 30,
    adapter: AdapterOpt = None,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = Path("runs/eval-cache"),
    out: Annotated[Path, typer.Option("--out", "-o", help="report directory")] = Path("runs/eval"),
) -> None:
    """Build (or resume) a sample pool, replay strategies over it, and write a report with plots."""
    from edge_adapt.eval import EvalConfig, run_eval

    fields = _pool_fields(suite=suite, split=split, data=data, scorer=scorer, n_prompts=n_prompts, k=k, temp=temp,
                          max_tokens=max_tokens, prune_at=prune_at, seed=seed, model=model, threads=threads,
                          adapter=adapter, cache_dir=cache_dir)
    cfg = validated(EvalConfig, {**fields, "out_dir": out, "live": live or [], "live_prompts": live_prompts}, "eval")
    run_eval(cfg)
    print(f"report written to {out / 'report.md'}")


@app.command("tune-policy")
def tune_policy_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="policy JSON to write")],
    suite: SuiteOpt = "arith",
    split: Annotated[str, typer.Option("--split", help="the split the policy is tuned on")] = "validation",
    data: DataOpt = None,
    scorer: ScorerOpt = None,
    n_prompts: Annotated[int, typer.Option("--prompts", help="tuning prompts", min=1)] = 150,
    k: PoolKOpt = 16,
    temp: PoolTempOpt = 0.7,
    max_tokens: MaxTokOpt = 96,
    prune_at: PrunePointsOpt = None,
    budget: Annotated[Optional[list[int]], typer.Option("--budget", help="budget to tune for (repeatable; default 2 4 6 8 12 16)", min=1)] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="a cheaper choice within this accuracy of the best wins", min=0, max=1)] = 0.02,
    test_split: Annotated[Optional[str], typer.Option("--test-split", help="also report the policy on this split")] = None,
    test_prompts: Annotated[int, typer.Option("--test-prompts", min=1)] = 200,
    report: Annotated[Optional[Path], typer.Option("--report", help="report directory (with --test-split)")] = None,
    live: Annotated[Optional[list[str]], typer.Option("--live", help="strategy to also run live on test prompts (repeatable)")] = None,
    live_prompts: Annotated[int, typer.Option("--live-prompts", min=1)] = 40,
    live_budget: Annotated[int, typer.Option("--live-budget", min=2)] = 8,
    compare_model: Annotated[Optional[Path], typer.Option("--compare-model", help="a larger GGUF model to compare with at equal compute (with --test-split)")] = None,
    seed: SeedOpt = 0,
    adapter: AdapterOpt = None,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = Path("runs/eval-cache"),
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing policy file")] = False,
) -> None:
    """Build the compute-optimal policy `--strategy auto` follows: per difficulty bin and budget, the strategy
    that does best on the tuning pool (two-fold cross-validated), optionally reported on a held-out split."""
    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval.tune import DEFAULT_BUDGETS
    from edge_adapt.eval.tune_run import TuneConfig, run_tune
    from edge_adapt.strategies import StrategyConfig

    fields = _pool_fields(suite=suite, split=split, data=data, scorer=scorer, n_prompts=n_prompts, k=k, temp=temp,
                          max_tokens=max_tokens, prune_at=prune_at, seed=seed, model=model, threads=threads,
                          adapter=adapter, cache_dir=cache_dir)
    pool = validated(EvalConfig, fields, "tune-policy")
    if test_split is None and (report or live or compare_model):
        raise UsageError("--report, --live and --compare-model need --test-split")
    if compare_model is not None:
        from edge_adapt.engine.gguf_file import inspect_gguf

        inspect_gguf(compare_model)  # a bad file fails now, not after the tuning
    if any(b < 2 for b in budget or ()):
        raise UsageError("a budget must be at least 2 (the probe and one more sample)")
    for name in live or ():
        StrategyConfig.parse({"strategy": name}, f"--live {name}")
    cfg = validated(TuneConfig, dict(pool=pool, budgets=budget or list(DEFAULT_BUDGETS), tolerance=tolerance, out=out,
                                     force=force, test_split=test_split, test_prompts=test_prompts, report_dir=report,
                                     live=live or [], live_prompts=live_prompts, live_budget=live_budget,
                                     compare_model=compare_model), "tune-policy")
    result = run_tune(cfg)
    print(f"policy written to {out}")
    for b, choices in result["choices"].items():
        print(f"  budget {b}: " + " | ".join(f"bin {i}: {c}" for i, c in enumerate(choices, start=1)))
    if report and "test" in result:
        print(f"report written to {report / 'report.md'}")


# -- label / train: teaching the model to evaluate itself ---------------------------------------------------
def _work_progress() -> Any:
    """The progress display of long jobs (the one `eval` shows)."""
    from edge_adapt.eval.run import progress_display

    return progress_display(True)



@app.command("label")
def label_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="label dataset to write (.jsonl)")],
    suite: SuiteOpt = "arith",
    split: Annotated[str, typer.Option("--split", help="arith split (never the one you report on)")] = "train",
    data: DataOpt = None,
    scorer: ScorerOpt = None,
    n_prompts: Annotated[int, typer.Option("--prompts", help="training prompts to label", min=1)] = 300,
    level: Annotated[Optional[list[int]], typer.Option("--level", help="arith level to label (repeatable; all when omitted)")] = None,
    k: Annotated[int, typer.Option("-k", "--samples", help="samples per prompt", min=2, max=64)] = 16,
    temp: Annotated[float, typer.Option("--temp", help="sampling temperature")] = 0.7,
    max_tokens: MaxTokOpt = 96,
    cut: Annotated[Optional[list[int]], typer.Option("--cut", help="also emit responses cut at this many tokens (repeatable)")] = None,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = Path("runs/eval-cache"),
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing dataset")] = False,
) -> None:
    """Sample K responses per training prompt and label each with its self-eval target."""
    from edge_adapt.train import LabelConfig, label_iter

    fields = dict(out=out, suite=suite, split=split, data=data, scorer=scorer, n_prompts=n_prompts, levels=level, k=k,
                  temperature=temp, max_tokens=max_tokens, seed=seed, model=model, threads=threads,
                  cache_dir=cache_dir, force=force)
    if cut:
        fields["cuts"] = cut
    cfg = validated(LabelConfig, fields, "label")
    t0 = time.perf_counter()
    tokens = generated = 0
    with _work_progress() as bar:
        task = bar.add_task(f"label {suite}/{split} K={k}", total=n_prompts, info="")
        for step in label_iter(cfg):
            tokens += step.tokens
            generated += step.generated
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=step.done, total=step.total, info=f"{rate:.0f} tok/s" if generated else "cached")
    print(f"wrote {out} ({n_prompts} prompts, {generated} generated now) in {time.perf_counter() - t0:.0f}s")


@app.command("train")
def train_cmd(
    labels: Annotated[list[Path], typer.Argument(help="training labels from `edge-adapt label` (one or more files)")],
    validation: Annotated[list[Path], typer.Option("--validation", help="labels of held-out prompts, validated each epoch (repeatable: merged)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (adapter.gguf or model.gguf, metrics, plot)")],
    method: Annotated[str, typer.Option("--method", help="alora | lora | full")] = "alora",
    target: Annotated[str, typer.Option("--target", help="relative (share of other samples not better) | correct")] = "relative",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 2,
    init: Annotated[Optional[Path], typer.Option("--init", help="continue from a previous run's checkpoint/ directory or an adapter GGUF")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="learning rate (3e-4 for (a)LoRA, 2e-5 for full)")] = None,
    rank: Annotated[int, typer.Option("--rank", min=1)] = 8,
    suffix: Annotated[Optional[str], typer.Option("--suffix", help="raw self-eval suffix to train on (default <|im_end|>Restart)")] = None,
    prompts_per_step: Annotated[int, typer.Option("--prompts-per-step", min=1)] = 4,
    lm_loss: Annotated[float, typer.Option("--lm-loss", help="weight of an LM loss on the responses (full)")] = 0.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="stop early (smoke tests)")] = None,
    validate_before: Annotated[bool, typer.Option("--validate-before/--no-validate-before", help="validate the untrained model too")] = True,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    force: Annotated[bool, typer.Option("--force", help="overwrite a non-empty output directory")] = False,
) -> None:
    """Train the self-eval adapter (needs the \\[train] extra) and export it to GGUF."""
    try:
        from edge_adapt.train.config import TrainConfig
        from edge_adapt.train.trainer import train
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"training needs the [train] extra: pip install 'edge-adapt[train]' ({exc.name} is missing)") from None
    cfg = validated(TrainConfig, dict(
        labels=labels, validation=validation, out=out, method=method, target=target, epochs=epochs, init=init, lr=lr,
        rank=rank, prompts_per_step=prompts_per_step, lm_loss=lm_loss, max_steps=max_steps, model=model,
        validate_before=validate_before, threads=threads, seed=seed, force=force,
        **({"suffix": suffix} if suffix is not None else {})), "train")
    with _work_progress() as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, info: str) -> None:
            if stage == "validate":
                bar.console.print(info)
                return
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, info="")
            bar.update(tasks[stage], completed=done, total=total, info=info)
            if not bar.console.is_terminal and done % 10 == 0:  # logs get a line now and then
                bar.console.print(f"{stage} {done}/{total} {info}")

        result = train(cfg, progress=update)
    best = next(e for e in result.epochs if e.epoch == result.best_epoch)
    typer.echo(f"wrote {result.exported} (best epoch {result.best_epoch}: validation AUROC "
               f"{best.auroc if best.auroc is None else round(best.auroc, 3)}, Brier {best.brier:.3f} vs constant "
               f"{best.brier_constant:.3f}) in {result.seconds / 60:.1f} min, peak RSS {result.peak_rss_mib:.0f} MiB")


# -- convert / convert-adapter / import: HF <-> GGUF ---------------------------------------------------------
@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar on stderr, fed by the library's (stage, done, total) calls."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{label}: {stage}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


@app.command("convert")
def convert_cmd(
    hf_dir: Path = typer.Argument(..., help="transformers checkpoint directory (config.json, safetensors, tokenizer)"),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF file to write"),
    type: str = typer.Option("f16", "--type", help="f32|f16|bf16|q8_0|q4_0|q4_1|q4_k_m|q5_k_m|q6_k"),
    merge_adapter: Optional[Path] = typer.Option(None, "--merge-adapter", help="PEFT LoRA directory to merge in"),
    self_eval_config: Optional[Path] = typer.Option(None, "--self-eval-config", help="JSON written as edge_adapt.self_eval.*"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Convert a transformers checkpoint to a GGUF model."""
    from edge_adapt.convert import convert_model

    with _progress_bar("convert") as progress:
        r = convert_model(hf_dir, output, type=type, merge_adapter=merge_adapter,
                          self_eval_config=self_eval_config, force=force, progress=progress)
    typer.echo(f"wrote {r.path} ({r.architecture}, {r.type}, {r.n_params / 1e6:.1f}M params, "
               f"{r.file_size / 2**20:.1f} MiB) in {r.seconds:.1f}s")


@app.command("convert-adapter")
def convert_adapter_cmd(
    peft_dir: Path = typer.Argument(..., help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)"),
    base: Path = typer.Option(..., "--base", help="the base model GGUF the adapter will be loaded on"),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF adapter file to write"),
    self_eval_config: Optional[Path] = typer.Option(None, "--self-eval-config", help="JSON written as edge_adapt.self_eval.*"),
    type: str = typer.Option("f32", "--type", help="f32 | f16"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Convert a PEFT LoRA or activated LoRA to a GGUF adapter."""
    from edge_adapt.convert import convert_adapter

    with _progress_bar("convert-adapter") as progress:
        r = convert_adapter(peft_dir, base, output, self_eval_config=self_eval_config, type=type, force=force,
                              progress=progress)
    kind = f"aLoRA, invocation tokens {r.invocation_tokens}" if r.invocation_tokens else "LoRA"
    typer.echo(f"wrote {r.path} ({kind}, {r.n_tensors} tensors, alpha {r.alpha:g}) in {r.seconds:.1f}s")


@app.command("import")
def import_cmd(
    model: Optional[Path] = typer.Argument(None, help="GGUF model; the embedded default model when omitted"),
    output: Path = typer.Option(..., "-o", "--output", help="transformers checkpoint directory to write"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Dequantize a GGUF model back to a transformers checkpoint (for fine-tuning)."""
    from edge_adapt.convert import import_gguf

    with _progress_bar("import") as progress:
        r = import_gguf(model, output, force=force, progress=progress)
    typer.echo(f"wrote {r.path} ({r.architecture}, {r.n_params / 1e6:.1f}M params, float32) in {r.seconds:.1f}s")


def _interrupted() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the one line short
    print(interrupts.MESSAGE, file=sys.stderr)
    sys.exit(interrupts.EXIT_CODE)


def main() -> None:
    from edge_adapt.engine.events import Cancelled

    interrupts.install()  # Ctrl-C raises KeyboardInterrupt from here on; what a command created is taken back
    try:
        # typer turns KeyboardInterrupt into Exit(130), which standalone_mode=False returns instead of raising.
        code = app(standalone_mode=False)
        interrupts.check()
    except EdgeAdaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt, Cancelled):  # Cancelled: Ctrl-C stopped a decode outside generation
        _interrupted()
    except TyperException as exc:  # bad options and arguments, as typer's bundled click reports them
        print(f"error: {exc.format_message()}", file=sys.stderr)  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", 2))
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if _debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        sys.exit(70)
    if code == interrupts.EXIT_CODE:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
