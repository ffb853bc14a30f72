"""The `edge-adapt` command line: parse options, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import os
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
def _named_path(value: str) -> Path:
    """A file to read. Path("") is ".", which would be refused as a directory the user never named."""
    if not value.strip():
        raise typer.BadParameter("is empty; give a file's name")
    return Path(value)


ModelArg = Annotated[Optional[Path], typer.Argument(help="GGUF model (default: embedded SmolLM2-135M-Instruct)", parser=_named_path)]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF model (default: embedded SmolLM2-135M-Instruct)", parser=_named_path)]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", help="context length per sequence (tokens)", min=64)]


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    metal = "metal"


def _file_path(value: str) -> Path:
    """A file to write. Path() drops a trailing slash, which would write a file where the user meant a folder."""
    if value.endswith(("/", os.sep)):
        raise typer.BadParameter(f"'{value}' names a folder; give the file's name in it")
    return Path(value)


DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="where to run")]
GpuLayersOpt = Annotated[Optional[int], typer.Option("--gpu-layers", help="layers to offload to the GPU (-1: all)", min=-1)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: physical cores)", min=1, max=512)]
BudgetOpt = Annotated[Optional[str], typer.Option("--mem-budget", help="refuse plans above this much memory, e.g. 1.5GB")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="show llama.cpp's own log")]
# Sampling flags carry no ranges here: edge_adapt.engine.sampling declares them once, for every entry point.
TempOpt = Annotated[Optional[float], typer.Option("--temp", help="sampling temperature (0: greedy; default 0.7, but run without a strategy: greedy for one sample)")]
MaxTokOpt = Annotated[Optional[int], typer.Option("--max-tokens", help="most tokens to generate per sample (run: 256, chat: 512)", min=1)]
PoolMaxTokOpt = Annotated[Optional[int], typer.Option("--max-tokens", help="most tokens per sampled reply (default: each task family's own, 96 for other suites)", min=1)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="random seed (run, chat: sample i uses seed + i; eval, label, tune-policy pools: each sample's seed is a hash of it, the prompt and i)")]
SuiteOpt = Annotated[str, typer.Option("--suite", help="arith, gsm8k, mix (all task families), or a user suite .jsonl file")]
FamilyOpt = Annotated[Optional[str], typer.Option("--family", help="one task family instead of --suite (docs/tasks.md)")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="suite file (gsm8k: the shared training split by default)")]
ScorerOpt = Annotated[Optional[str], typer.Option("--scorer", help="final-number | stated-number | exact | regex:PATTERN | module:function")]
PoolKOpt = Annotated[int, typer.Option("-k", "--samples", help="samples per prompt in the pool", min=1, max=64)]
PoolTempOpt = Annotated[float, typer.Option("--temp", help="sampling temperature of the pool")]
PrunePointsOpt = Annotated[Optional[list[int]], typer.Option("--prune-at", help="token counts where scores are recorded (repeatable; default 16 32, those below the reply budget)")]
CacheOpt = Annotated[Path, typer.Option("--cache", help="sample pool cache (resumable; shared by eval and label)")]
BackendOpt = Annotated[Optional[str], typer.Option("--backend", help="sample on this OpenAI-compatible server (vLLM, llama-server, edge-adapt serve) instead of in process; API key from $EDGE_ADAPT_BACKEND_KEY")]
BackendModelOpt = Annotated[Optional[str], typer.Option("--backend-model", help="the server's model name (default: the one it serves)")]
BackendSelfEvalOpt = Annotated[Optional[str], typer.Option("--backend-selfeval", help="the server's self-eval model name (default: edge-adapt serve's MODEL:selfeval)")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="requests in flight to --backend at once", min=1, max=1024)]
BackendWaitOpt = Annotated[float, typer.Option("--backend-wait", help="seconds a --backend request is retried (429, 5xx, a restarting server)", min=0)]
BackendTimeoutOpt = Annotated[float, typer.Option("--backend-timeout", help="seconds to wait for one --backend answer (raise it for a server that queues requests past its slots)", min=1)]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", help="keep the k most likely tokens (0: off; default 40)")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="nucleus sampling mass (default 0.95)")]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", help="drop tokens below min-p x the top probability (default 0.05)")]
RepeatOpt = Annotated[Optional[float], typer.Option("--repeat-penalty", help="penalty for recently seen tokens (1: off; default 1, chat: 1.1)")]


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for unexpected errors")] = False) -> None:
    global _debug
    _debug = debug
    # Started with stdout closed (`>&-`), print() writes nowhere without a word: an answer, a report path, a
    # benchmark would be lost while the command says it succeeded. A server is left to run (a daemon may well
    # close its stdout); its requests are answered over HTTP.
    if sys.stdout is None and ctx.invoked_subcommand not in (None, "serve"):
        raise UsageError(f"standard output is closed: {ctx.invoked_subcommand} would write its output nowhere "
                         "(redirect it to a file or /dev/null)")


def _text_arg(value: str, what: str) -> str:
    """Command-line text must be UTF-8: Python hands undecodable bytes through as lone surrogates. "-" reads
    standard input, less one trailing newline (as $(...) drops it: `echo PROMPT | run -` is `run PROMPT`)."""
    if value == "-":
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise UsageError(f"{what} is '-' (read standard input), but standard input is closed")
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{what} on standard input is not valid UTF-8 (byte {exc.start})") from None
        return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    return _utf8(value, what)


def _system_arg(value: str) -> str:
    """--system's text, refused when empty as an empty prompt is: dropped, it would answer as if none was given."""
    text = _text_arg(value, "--system")
    if not text.strip():
        raise UsageError("--system on standard input is empty" if value == "-" else "--system is empty")
    return text


def _utf8(value: str, what: str) -> str:
    """`value` as given on the command line, refused unless it is UTF-8 (undecodable bytes arrive as lone
    surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8") from None
    return value


def _show(job: Any) -> Any:
    """Run a library job, drawing its Progress events as bars on stderr and every event's message as a line;
    returns the job's result. Off a terminal the bars stay silent, so logs get the messages only."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from edge_adapt.progress import finish

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True,
                  disable=not console.is_terminal) as bar:  # off a terminal even a stopped bar's newline is noise
        tasks: dict[str, Any] = {}

        def show(p: Any) -> None:
            if p.message is not None:  # as written: not wrapped at 80 columns in a log, no [markup] read in it
                console.print(p.message, soft_wrap=True, markup=False, highlight=False)
                return
            if p.task not in tasks:
                tasks[p.task] = bar.add_task(p.task, total=p.total, info="")
            bar.update(tasks[p.task], completed=p.done, total=p.total, info=p.info)

        return finish(job, show)


def _one_model(arg: Path | None, option: Path | None) -> Path | None:
    """The model given as MODEL or with --model (as `run` takes it), not both."""
    if arg is not None and option is not None:
        raise UsageError("give the model once: as MODEL or with --model")
    return arg if arg is not None else option


def _options(model: Path | None, *, device: DeviceChoice = DeviceChoice.auto, gpu_layers: int | None = None,
             threads: int | None = None, verbose: bool = False) -> Any:
    from edge_adapt.engine import EngineOptions

    return EngineOptions(model=model, device=device.value, gpu_layers=gpu_layers, threads=threads, verbose=verbose)


@contextmanager
def _ctrl_c_cancels(engine: Any, *, then_exit: bool = True) -> Iterator[None]:
    """While generating, Ctrl-C stops the reply (the engine ends it cleanly); then the command ends as
    interrupted (exit 130), or with `then_exit=False` (chat) carries on."""
    with _ctrl_c_waits(engine.cancel) as hit:
        yield
    if hit and then_exit:
        raise KeyboardInterrupt


@contextmanager
def _ctrl_c_waits(then: Callable[[], None] = lambda: None) -> Iterator[list[int]]:
    """Ctrl-C is held until the block ends (`then` is called at each press); the list says whether it came."""
    hit: list[int] = []

    def on_sigint(*_: Any) -> None:
        hit.append(1)
        then()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _streamed() -> Iterator[Callable[[str], None]]:
    """A writer of reply text to stdout as it streams. When the stream ends in an exception (Ctrl-C, SIGTERM, an
    error) mid-line, that line is ended first, so that what goes to stderr (`interrupted`) is a line of its own."""
    mid_line = False

    def write(text: str) -> None:
        nonlocal mid_line
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            mid_line = not text.endswith("\n")

    try:
        yield write
    except BaseException:
        if mid_line:
            print(flush=True)
        raise


StrategyOpt = Annotated[Optional[str], typer.Option("--strategy", "-s", help="a self-evaluation strategy (best-of-n, adaptive, prune, vote, beam, revise, auto ...: the README lists them)")]
BudgetNOpt = Annotated[Optional[int], typer.Option("--budget", help="samples: N of best-of-n / prune / votes, the most adaptive may start; beam / lookahead: candidates per step; revise: attempts in all", min=1)]
ThresholdOpt = Annotated[Optional[float], typer.Option("--threshold", help="adaptive: stop when a sample's p_keep reaches this")]
PruneAtOpt = Annotated[Optional[list[int]], typer.Option("--prune-at", help="prune: token count to score and prune at (repeatable)")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="strategy TOML/JSON file (flags given override it)", parser=_named_path)]
PolicyOpt = Annotated[Optional[Path], typer.Option("--policy", help="auto: compute-optimal policy JSON (default: the one shipped for the default model)", parser=_named_path)]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="self-eval adapter GGUF (LoRA / aLoRA), on only while scoring; 'none': not even the default model's shipped one", parser=_named_path)]


def _no_adapter(adapter: Path | None) -> bool:
    return adapter is not None and str(adapter).lower() == "none"


def _strategy_config(path: Path | None, *, adapter: Path | None = None, defaults: dict[str, Any] | None = None,
                     unread_ok: bool = False, **flags: Any) -> Any:
    """The strategy settings: the command's own `defaults`, then the --config file (if any), then each flag that
    was given. A file's setting the strategy does not read is refused unless `unread_ok` (StrategyConfig.from_file)."""
    from edge_adapt.selfeval import SelfEvalConfig
    from edge_adapt.strategies import StrategyConfig

    cfg = StrategyConfig.from_file(path, defaults=defaults, unread_ok=unread_ok, **flags) if path else StrategyConfig.parse(
        {**(defaults or {}), **{k: v for k, v in flags.items() if v is not None}})
    if adapter is not None:
        update: dict[str, Any] = {"default_adapter": False} if _no_adapter(adapter) else {"adapter": adapter}
        cfg = cfg.model_copy(update={"self_eval": (cfg.self_eval or SelfEvalConfig()).model_copy(update=update)})
    return cfg


def _refuse_unread(cfg: Any, flags: dict[str, tuple[str, Any]]) -> None:
    """Refuse the flags given (`flags`: StrategyConfig field -> (flag, value, None when not given)) that cfg's
    strategy does not read: ignored in silence, they would seem to have done something."""
    unread = [flags[f][0] for f in cfg.unread(f for f, (_, value) in flags.items() if value is not None)]
    if unread:
        raise UsageError(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not used by strategy "
                         f"{cfg.strategy}")


def _print_result(result: Any, *, show_scores: bool) -> None:
    """A strategy's answer (with every sample's scores and the compute account when asked), or plain samples."""
    if result.chosen is None:
        for s in result.samples:
            print(f"--- sample {s.index} ({s.tokens} tokens, {s.finish_reason}) ---\n{s.text}")
        return
    if show_scores:
        for s in result.samples:
            trail = "  ".join(f"@{n}: {p:.3f}" for n, p in s.scores)
            mark = "*" if result.chosen.sample == s.index else " "
            print(f"{mark} sample {s.index:>2}  {s.tokens:>4} tokens  {s.finish_reason:<9} {trail}")
        d, u = result.difficulty, result.usage
        if d is not None:
            row = "" if d.row_budget is None else (f", from the policy's row for budget {d.row_budget}: it has "
                                                   "none for this budget, and the rest goes unspent")
            print(f"  difficulty bin {d.bin} of 5 (probe p_keep {d.p_keep:.3f}): {d.choice}{row}")
        print(f"  compute: {u.samples_started} samples ({u.samples_pruned} pruned), {u.generated_tokens} "
              f"generated + {u.selfeval_tokens} self-eval tokens, {u.wall_s:.1f} s\n")
    print(result.chosen.text)


# -- run ----------------------------------------------------------------------------------------------------
@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="the prompt ('-': read it from standard input)")],
    n: Annotated[Optional[int], typer.Option("-n", "--samples", help="samples to draw in parallel (with --strategy: the budget)", min=1, max=255)] = None,
    temp: TempOpt = None,
    max_tokens: MaxTokOpt = None,
    seed: SeedOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="stop string (repeatable)")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="plain completion: no chat template (with a strategy too)")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="system message ('-': read it from standard input)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result (samples, scores, usage, timing) as JSON")] = False,
    strategy: StrategyOpt = None,
    budget: BudgetNOpt = None,
    threshold: ThresholdOpt = None,
    config: ConfigOpt = None,
    adapter: AdapterOpt = None,
    policy: PolicyOpt = None,
    beam_width: Annotated[Optional[int], typer.Option("--beam-width", help="beam/lookahead: M, expansions per kept beam", min=1)] = None,
    step_tokens: Annotated[Optional[int], typer.Option("--max-step-tokens", help="beam/lookahead: longest step", min=1)] = None,
    lookahead: Annotated[Optional[int], typer.Option("--lookahead", help="lookahead: greedy steps rolled out before scoring", min=1)] = None,
    # No range here: StrategyConfig checks it, NaN too (which a range check would call "greater than 1").
    sequential_ratio: Annotated[Optional[float], typer.Option("--sequential-ratio", help="revise: share of the budget one chain of revisions spends (0 to 1; about 1/ratio chains)")] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", "-k", help="prune: samples kept at each prune point", min=1)] = None,
    prune_at: PruneAtOpt = None,
    show_scores: Annotated[bool, typer.Option("--show-scores", help="print every sample's self-eval score")] = False,
    model: ModelOpt = None,
    ctx: CtxOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    mem_budget: BudgetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Answer one prompt; with -n, draw several samples from one decoded prompt; with --strategy, spend them by
    self-evaluation."""
    from edge_adapt.engine import SamplingParams, Token, Vocab
    from edge_adapt.errors import ContextOverflowError
    from edge_adapt.result import Collector
    from edge_adapt.sizing import engine_for_generation, engine_for_strategy
    from edge_adapt.strategies import StrategyConfig, run_strategy

    if prompt == "-" and system == "-":
        raise UsageError("the prompt and --system cannot both be '-': standard input holds one text")
    if raw and system is not None:
        raise UsageError("--system needs the chat template; --raw sends the prompt as it is")
    text = _text_arg(prompt, "the prompt")
    if not text.strip():
        raise UsageError("the prompt on standard input is empty" if prompt == "-" else "the prompt is empty")
    prompt = text
    messages = ([{"role": "system", "content": _system_arg(system)}] if system is not None else []) + [
        {"role": "user", "content": prompt}]
    if stop and "" in stop:
        raise UsageError("--stop takes a non-empty string (an empty one would end every reply at once)")
    for s in stop or ():  # a string no reply could ever match
        _utf8(s, "--stop")
    sampling = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)
    cfg = None
    if strategy is not None or config is not None:  # -s "" is a strategy named wrong, not none
        if n is not None and budget is not None and n != budget:
            raise UsageError(f"-n {n} and --budget {budget} disagree: with a strategy, -n is the budget")
        cfg = _strategy_config(config, strategy=strategy, budget=budget if budget is not None else n,
                               threshold=threshold, adapter=adapter, max_tokens=max_tokens,
                               stop=tuple(stop) if stop else None, keep=keep, prune_at=tuple(prune_at) if prune_at else None,
                               policy=policy, beam_width=beam_width, max_step_tokens=step_tokens, lookahead=lookahead,
                               sequential_ratio=sequential_ratio, **sampling)
    if policy is not None and (cfg is None or cfg.strategy != "auto"):
        raise UsageError("--policy is only used by --strategy auto")
    # A strategy's settings that would be ignored in silence: all of them without a strategy, and with one those
    # it does not read (each flag by its StrategyConfig field).
    flags = {"budget": ("--budget" if budget is not None else "-n", budget if budget is not None else n),
             "threshold": ("--threshold", threshold), "self_eval": ("--adapter", adapter),
             "beam_width": ("--beam-width", beam_width), "max_step_tokens": ("--max-step-tokens", step_tokens),
             "lookahead": ("--lookahead", lookahead), "sequential_ratio": ("--sequential-ratio", sequential_ratio),
             "k": ("--keep", keep), "prune_at": ("--prune-at", prune_at)}
    if cfg is None:
        given = [flag for flag, value in flags.values() if value is not None and flag != "-n"]  # -n: samples
        given += ["--show-scores"] if show_scores else []
        if given:
            raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only used with --strategy "
                             "(without one, samples are not scored)")
    else:
        flags.update({"temperature": ("--temp", temp), "top_k": ("--top-k", top_k), "top_p": ("--top-p", top_p),
                      "min_p": ("--min-p", min_p), "repeat_penalty": ("--repeat-penalty", repeat_penalty)})
        _refuse_unread(cfg, flags)
    t0 = time.perf_counter()
    opts = _options(model, device=device, gpu_layers=gpu_layers, threads=threads, verbose=verbose)
    replies = max_tokens or 256
    if cfg is not None:
        as_given: Any = messages
        if raw:  # token ids are a prompt as it is (strategies.prompt_tokens), with the model's BOS as plain runs do
            with Vocab(opts.model) as vocab:
                as_given = vocab.tokenize(prompt, add_bos=True)
        engine, plan = engine_for_strategy(as_given, cfg, opts, ctx=ctx, mem_budget=mem_budget)
    else:
        # Several greedy samples would be one answer N times: they sample as a strategy's do, unless --temp says.
        default_temp = 0.0 if (n or 1) == 1 else StrategyConfig.model_fields["temperature"].default
        params = SamplingParams(**{"temperature": default_temp, **{k: v for k, v in sampling.items() if v is not None}})
        idle = [flag for flag, value in (("--seed", seed), ("--top-k", top_k), ("--top-p", top_p), ("--min-p", min_p))
                if value is not None]
        if params.greedy and idle:  # greedy decoding takes the likeliest token: it draws nothing, filters nothing
            why = "--temp 0" if temp is not None else "one sample without --temp"
            raise UsageError(f"{', '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect on greedy decoding "
                             f"({why}): give --temp above 0 to sample")
        engine, tokens = engine_for_generation(prompt if raw else messages, n or 1, replies, opts, raw=raw,
                                               ctx=ctx, mem_budget=mem_budget)
    stream = not as_json and not show_scores and (cfg.strategy == "single" if cfg else (n or 1) == 1)
    collector = Collector()
    with _streamed() as write, engine, _ctrl_c_cancels(engine):
        if cfg is None and len(tokens) + replies > engine.n_ctx_seq:  # only a --ctx given can be too small
            # Said in the flags' terms: the engine knows neither the default --max-tokens nor how --ctx was rounded.
            room = f"the context of {engine.n_ctx_seq} tokens per sequence" + (
                f" (--ctx {ctx}, rounded up to llama.cpp's cells)" if ctx is not None and ctx != engine.n_ctx_seq else "")
            if len(tokens) >= engine.n_ctx_seq:
                raise ContextOverflowError(f"the prompt's {len(tokens)} tokens do not fit {room}: raise --ctx or "
                                           "shorten the prompt")
            raise ContextOverflowError(
                f"the prompt ({len(tokens)} tokens) and --max-tokens {replies}{'' if max_tokens else ' (the default)'} "
                f"need {len(tokens) + replies} tokens, which do not fit {room}: raise --ctx or lower --max-tokens")
        t_load = first_token_at = time.perf_counter()
        events = run_strategy(engine, plan.prompt, plan.config) if cfg is not None else engine.generate(
            tokens, params, n=n or 1, max_tokens=replies, stop=stop or ())
        for ev in events:
            collector.add(ev)
            if isinstance(ev, Token):
                first_token_at = first_token_at if first_token_at > t_load else time.perf_counter()
                if stream:
                    write(ev.text)
        t_end = time.perf_counter()
    result = collector.result()
    if as_json:
        gen = result.usage.generated_tokens
        print(json.dumps({
            "model": str(engine.model_path), "strategy": cfg.strategy if cfg else None, **result.to_dict(),
            "timing": {"load_s": round(t_load - t0, 4), "first_token_s": round(first_token_at - t_load, 4),
                       "generate_s": round(t_end - t_load, 4), "tokens_per_s": round(gen / max(t_end - t_load, 1e-9), 2)},
        }, ensure_ascii=False, indent=2))
    elif stream:
        print()
    else:
        _print_result(result, show_scores=show_scores)


# -- chat ---------------------------------------------------------------------------------------------------
# chat's own settings where neither a flag nor the --config file gives one (StrategyConfig's otherwise): longer
# replies than run's, less repetition over a long conversation.
CHAT_DEFAULTS: dict[str, Any] = dict(max_tokens=512, repeat_penalty=1.1)


@app.command()
def chat(
    model: ModelArg = None,
    model_opt: ModelOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="system message (not '-': standard input carries the turns)")] = None,
    # None: not given, so that a --config file's value stands (CHAT_DEFAULTS where neither sets one).
    temp: TempOpt = None,
    max_tokens: MaxTokOpt = None,
    seed: SeedOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="context length of the conversation (default 4096, or the model's training context when shorter)", min=64)] = None,
    strategy: StrategyOpt = None,
    budget: BudgetNOpt = None,
    threshold: ThresholdOpt = None,
    config: ConfigOpt = None,
    adapter: AdapterOpt = None,
    prune_at: PruneAtOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    mem_budget: BudgetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Talk with a model; the KV cache is kept across turns so each turn decodes only what is new.

    With --strategy (or a --config file's strategy), a flag that strategy does not read is refused, as run refuses
    it. Without one, replies are plain samples, and --budget, --threshold, --prune-at and --adapter are the
    settings a later /strategy starts from."""
    model = _one_model(model, model_opt)
    if sys.stdin is None:  # started with stdin closed (`<&-`): there is nothing to read turns from
        raise UsageError("chat reads its turns from standard input, which is closed")
    if system == "-":  # reading it would swallow every turn piped after it
        raise UsageError("--system - would read the system message from standard input, which carries the chat's "
                         "turns; give the text itself")
    system = _system_arg(system) if system is not None else None
    from edge_adapt.engine import SamplingParams, Vocab
    from edge_adapt.engine.budget import parse_size
    from edge_adapt.session import ChatSession
    from edge_adapt.sizing import EngineSize, default_ctx, load_engine, strategy_sequences
    from edge_adapt.strategies import plan_run

    given = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                 max_tokens=max_tokens)
    # unread_ok: the file's settings for other strategies are kept for /strategy, as chat's flags are.
    base = _strategy_config(config, strategy=strategy, budget=budget, threshold=threshold, adapter=adapter,
                            prune_at=tuple(prune_at) if prune_at else None, defaults=CHAT_DEFAULTS, unread_ok=True,
                            **given)
    # Plain replies (no strategy, or single) sample with the same settings a strategy's samples would.
    params = SamplingParams(temperature=base.temperature, top_k=base.top_k, top_p=base.top_p, min_p=base.min_p,
                            repeat_penalty=base.repeat_penalty, seed=base.seed)
    with_strategy = strategy is not None or config is not None  # -s "" is a strategy named wrong, not none
    if with_strategy:  # the flags are meant for the strategy chat starts with (without one: kept for /strategy)
        _refuse_unread(base, {"budget": ("--budget", budget), "threshold": ("--threshold", threshold),
                              "self_eval": ("--adapter", adapter), "prune_at": ("--prune-at", prune_at),
                              "temperature": ("--temp", temp), "top_k": ("--top-k", top_k), "top_p": ("--top-p", top_p),
                              "min_p": ("--min-p", min_p), "repeat_penalty": ("--repeat-penalty", repeat_penalty)})
    opts = _options(model, device=device, gpu_layers=gpu_layers, threads=threads, verbose=verbose)
    with Vocab(opts.model) as vocab:
        # the conversation's own sequence, plus the samples of the strategy chosen at start
        sequences = strategy_sequences(plan_run(vocab, None, base)) if with_strategy else 1
    budget_bytes = parse_size(mem_budget) if mem_budget else None
    with load_engine(EngineSize(sequences, ctx or default_ctx(4096, vocab.info)), opts, mem_budget=budget_bytes,
                     info=vocab.info, fix="lower --budget or --ctx") as engine:
        session = ChatSession(engine, system=system, params=params,
                              max_tokens=base.max_tokens, strategy=base if with_strategy else None,
                              mem_budget=budget_bytes, unread_ok=True)  # flags refused above; the rest kept for /strategy
        if base.self_eval is not None and base.self_eval.adapter is not None:  # refused now, not at /strategy
            engine.load_adapter(base.self_eval.adapter)
        print(f"edge-adapt chat: {engine.info.name} ({engine.n_ctx_seq} tokens of context). /help for commands.")
        failed = _chat_turns(session, engine, base)
    if failed and not sys.stdin.isatty():  # a script feeding the chat learns that a message went unanswered
        raise typer.Exit(1)


def _chat_turns(session: Any, engine: Any, base: Any) -> int:
    """Read lines until /exit or the end of input: a message is answered, a /command carried out. Ctrl-C stops
    a reply (even one not started yet) or drops the line being typed, and waits for a command to finish (a half
    done /strategy or /load would leave the chat in between); SIGTERM ends the chat. The `> ` prompt is shown
    on a terminal only: piped in, it would be glued to the replies. Returns how many messages failed."""
    import io

    from edge_adapt.engine import Token
    from edge_adapt.engine.events import Cancelled, Finished
    from edge_adapt.interrupts import Terminated
    from edge_adapt.session import Notice
    from edge_adapt.strategies import Chosen

    if isinstance(sys.stdin, io.TextIOWrapper):
        # A strict decoder throws away its whole buffered chunk, the lines after a bad one too: undecodable
        # bytes become lone surrogates instead, and only their line is refused.
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - input() then edits the line and keeps a history
        except ImportError:  # Windows
            pass
    failed = 0
    while True:
        try:
            line = input("> " if interactive else "").strip()
            line.encode("utf-8")  # undecodable bytes arrive as lone surrogates
        except EOFError:
            if interactive:  # ends the prompt's line
                print()
            return failed
        except Terminated:
            raise
        except KeyboardInterrupt:
            print()
            continue
        except (UnicodeDecodeError, UnicodeEncodeError):  # the line is dropped, the chat goes on
            print("error: this line is not valid UTF-8; it was ignored", file=sys.stderr)
            failed += 1  # a message, or a command, that was not carried out
            continue
        try:
            if line.startswith("/"):
                with _ctrl_c_waits() as hit:
                    reply = session.command(line, base)
                if reply is None:
                    return failed
                print(reply + ("\n(Ctrl-C waits for a command to finish; this one has)" if hit else ""))
            elif line:
                plain = session.strategy is None or session.strategy.strategy == "single"
                stopped = False
                # busy: a Ctrl-C from now on stops it
                with _streamed() as write, engine.busy(), _ctrl_c_cancels(engine, then_exit=False):
                    for ev in session.send(line):
                        if isinstance(ev, Notice):
                            print(f"({ev.text})")
                        elif isinstance(ev, Token) and plain:
                            write(ev.text)
                        elif isinstance(ev, Finished) and plain:
                            stopped = ev.reason == "cancelled"
                        elif isinstance(ev, Chosen):
                            score = f"p_keep {ev.p_keep:.2f}, " if ev.p_keep is not None else ""
                            write(f"{ev.text}\n({score}sample {ev.sample})")
                print("\n(stopped)" if stopped else "")
        except Cancelled:  # Ctrl-C ended a strategy's run or the prompt's decode: no reply, the chat goes on
            print("\n(stopped)")
        except EdgeAdaptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += not line.startswith("/")  # a command's error is its own; a message went unanswered


# -- serve --------------------------------------------------------------------------------------------------
@app.command()
def serve(
    model: ModelArg = None,
    model_opt: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on (other than loopback: set --api-key)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port (0: a free one, printed once bound)", min=0, max=65535)] = 8080,
    parallel: Annotated[int, typer.Option("--parallel", "-n", help="sequences decoded at once, over all requests", min=1, max=256)] = 16,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="context length per sequence (default 2048, or the model's training context when shorter)", min=64)] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="require 'Authorization: Bearer KEY' (not on /health, /v1/models)", envvar="EDGE_ADAPT_API_KEY")] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="requests that may wait for sequences; more get 429", min=0)] = 64,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="allow browser requests from this origin (repeatable; '*': any)")] = None,
    device: DeviceOpt = DeviceChoice.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    mem_budget: BudgetOpt = None,
    verbose: VerboseOpt = False,
    adapter: AdapterOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API; concurrent requests are decoded together."""
    model = _one_model(model, model_opt)
    from edge_adapt.server.serve import ServeConfig, serve as run_server

    self_eval = None
    if adapter is not None:
        from edge_adapt.selfeval import SelfEvalConfig

        self_eval = SelfEvalConfig(default_adapter=False) if _no_adapter(adapter) else SelfEvalConfig(adapter=adapter)
    run_server(ServeConfig(
        options=_options(model, device=device, gpu_layers=gpu_layers, threads=threads, verbose=verbose), host=host,
        port=port, parallel=parallel, ctx=ctx, mem_budget=mem_budget, api_key=api_key, max_queue=max_queue,
        cors_origins=tuple(cors_origin or ()), self_eval=self_eval))


# -- info ---------------------------------------------------------------------------------------------------
@app.command()
def info(
    model: ModelArg = None,
    model_opt: ModelOpt = None,
    mem_budget: BudgetOpt = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="context per sequence to plan for (default 1024, or the model's training context when smaller)", min=64)] = None,
    parallel: Annotated[Optional[int], typer.Option("-n", "--parallel", help="sequences to plan for", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Describe a GGUF model and plan its memory, or describe a LoRA / aLoRA adapter (no weights are loaded)."""
    model = _one_model(model, model_opt)
    from edge_adapt.engine.budget import adapter_facts, adapter_summary, fit, model_facts, parse_size, plan, summary
    from edge_adapt.engine.default_model import default_model_path
    from edge_adapt.engine.engine import check_training_context
    from edge_adapt.engine.gguf_file import inspect_gguf
    from edge_adapt.sizing import default_ctx

    meta = inspect_gguf(model or default_model_path(), expect="any")
    if meta.kind == "adapter":
        if mem_budget is not None or parallel is not None or ctx is not None:
            raise UsageError(f"{meta.path} is an adapter: it has no memory plan of its own (plan its model)")
        print(json.dumps(adapter_facts(meta), indent=2, default=str) if as_json else adapter_summary(meta))
        return
    ctx = ctx or default_ctx(1024, meta)
    check_training_context(ctx, meta)  # a plan for a context that run and chat would refuse is no plan
    budget = parse_size(mem_budget) if mem_budget is not None else None
    p = fit(meta, budget, ctx=ctx, want=parallel) if budget is not None else plan(meta, parallel=parallel or 1, ctx=ctx)
    print(json.dumps(model_facts(meta, p), indent=2, default=str) if as_json else summary(meta, p, budget))


# -- bench --------------------------------------------------------------------------------------------------
@app.command()
def bench(
    only: Annotated[Optional[list[str]], typer.Option("--only", help="single_stream | batched | fork | rss | raw | profile | clients | strategies (repeatable)")] = None,
    samples: Annotated[int, typer.Option("--samples", help="forked samples of batched, and the sequences of rss's second row (N x 512 tokens); the other sections use their own counts", min=2, max=255)] = 16,
    tokens: Annotated[int, typer.Option("--tokens", help="tokens per sample of single_stream and batched; raw, profile, clients and rss use at most 64; fork and strategies their own", min=8, max=2048)] = 128,
    repeats: Annotated[int, typer.Option("--repeats", help="best of this many runs per timing", min=1)] = 3,
    model: ModelOpt = None,
    device: DeviceOpt = DeviceChoice.cpu,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as one JSON document at the end (each section's lines go to stderr as it ends)")] = False,
) -> None:
    """Measure the engine against llama-cpp-python's high-level API, side by side, and print ratios: each
    section's as soon as it ends, with a line on stderr as each one starts."""
    from edge_adapt import bench as benchmarks
    from edge_adapt.bench.engine import BenchConfig
    from edge_adapt.progress import finish

    def show(p: Any) -> None:  # plain lines, no bar: a section runs for minutes, and its result goes to stdout
        if p.message is None:
            print(f"bench: {p.info} ({p.done + 1} of {p.total}) ...", file=sys.stderr, flush=True)
        else:
            print(p.message, file=sys.stderr if as_json else sys.stdout, flush=True)

    results = finish(benchmarks.run_job(BenchConfig(model=model, threads=threads, device=device.value, samples=samples,
                                                    tokens=tokens, repeats=repeats), set(only) if only else None), show)
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
    family: FamilyOpt = None,
    split: Annotated[str, typer.Option("--split", help="arith split: train, validation or test")] = "test",
    data: DataOpt = None,
    scorer: ScorerOpt = None,
    n_prompts: Annotated[int, typer.Option("--prompts", help="prompts to evaluate", min=1)] = 200,
    k: PoolKOpt = 16,
    temp: PoolTempOpt = 0.7,
    max_tokens: PoolMaxTokOpt = None,
    prune_at: PrunePointsOpt = None,
    seed: SeedOpt = 0,
    live: Annotated[Optional[list[str]], typer.Option("--live", help="also run this strategy for real: best-of-8 | adaptive (repeatable)")] = None,
    live_prompts: Annotated[int, typer.Option("--live-prompts", min=1)] = 30,
    adapter: AdapterOpt = None,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = Path("runs/eval-cache"),
    out: Annotated[Path, typer.Option("--out", "-o", help="report directory")] = Path("runs/eval"),
    backend: BackendOpt = None,
    backend_model: BackendModelOpt = None,
    backend_selfeval: BackendSelfEvalOpt = None,
    concurrency: ConcurrencyOpt = 8,
    backend_wait: BackendWaitOpt = 120.0,
    backend_timeout: BackendTimeoutOpt = 300.0,
    force: Annotated[bool, typer.Option("--force", help="overwrite a non-empty report directory")] = False,
) -> None:
    """Build (or resume) a sample pool, replay strategies over it, and write a report with plots."""
    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval.run import eval_job

    fields = _pool_fields(suite=suite, split=split, data=data, scorer=scorer, n_prompts=n_prompts, k=k, temp=temp,
                          max_tokens=max_tokens, prune_at=prune_at, seed=seed, model=model, threads=threads,
                          adapter=adapter, cache_dir=cache_dir, family=family, backend=backend,
                          backend_model=backend_model, backend_selfeval=backend_selfeval, concurrency=concurrency, backend_wait=backend_wait,
                          backend_timeout=backend_timeout)
    cfg = validated(EvalConfig, {**fields, "out_dir": out, "force": force, "live": live or [],
                                 "live_prompts": live_prompts}, "eval")
    _show(eval_job(cfg))
    print(f"report written to {out / 'report.md'}")


@app.command("tune-policy")
def tune_policy_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="policy JSON to write", parser=_file_path)],
    suite: SuiteOpt = "arith",
    family: FamilyOpt = None,
    split: Annotated[str, typer.Option("--split", help="the split the policy is tuned on")] = "validation",
    data: DataOpt = None,
    scorer: ScorerOpt = None,
    n_prompts: Annotated[int, typer.Option("--prompts", help="tuning prompts", min=1)] = 150,
    k: PoolKOpt = 16,
    temp: PoolTempOpt = 0.7,
    max_tokens: PoolMaxTokOpt = None,
    prune_at: PrunePointsOpt = None,
    budget: Annotated[Optional[list[int]], typer.Option("--budget", help="budget to tune for, at most --samples + 1 (repeatable; default 2 4 6 8 12 16 up to that)", min=1)] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="a cheaper choice within this accuracy of the best wins", min=0, max=1)] = 0.02,
    test_split: Annotated[Optional[str], typer.Option("--test-split", help="also report the policy on this split against best-of-N (printed, or in --report)")] = None,
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
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing policy file and a non-empty --report directory")] = False,
    backend: BackendOpt = None,
    backend_model: BackendModelOpt = None,
    backend_selfeval: BackendSelfEvalOpt = None,
    concurrency: ConcurrencyOpt = 8,
    backend_wait: BackendWaitOpt = 120.0,
    backend_timeout: BackendTimeoutOpt = 300.0,
) -> None:
    """Build the compute-optimal policy `--strategy auto` follows: per difficulty bin and budget, the strategy
    that does best on the tuning pool (two-fold cross-validated), optionally reported on a held-out split."""
    from edge_adapt.eval import EvalConfig
    from edge_adapt.eval.tune_run import TuneConfig, summary, tune_job

    fields = _pool_fields(suite=suite, split=split, data=data, scorer=scorer, n_prompts=n_prompts, k=k, temp=temp,
                          max_tokens=max_tokens, prune_at=prune_at, seed=seed, model=model, threads=threads,
                          adapter=adapter, cache_dir=cache_dir, family=family, backend=backend,
                          backend_model=backend_model, backend_selfeval=backend_selfeval, concurrency=concurrency, backend_wait=backend_wait,
                          backend_timeout=backend_timeout)
    pool = validated(EvalConfig, fields, "tune-policy")
    cfg = validated(TuneConfig, dict(pool=pool, **({"budgets": budget} if budget else {}), tolerance=tolerance, out=out,
                                     force=force, test_split=test_split, test_prompts=test_prompts, report_dir=report,
                                     live=live or [], live_prompts=live_prompts, live_budget=live_budget,
                                     compare_model=compare_model), "tune-policy")
    result = _show(tune_job(cfg))
    print(f"policy written to {out}")
    for b, choices in result["choices"].items():
        print(f"  budget {b}: " + " | ".join(f"bin {i}: {c}" for i, c in enumerate(choices, start=1)))
    if report and "test" in result:
        print(f"report written to {report / 'report.md'}")
    elif "test" in result:  # no report to hold it: the held-out comparison --test-split asked for is shown here
        print(summary(result))


# -- label / train: teaching the model to evaluate itself ---------------------------------------------------
@app.command("label")
def label_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="label dataset to write (.jsonl)", parser=_file_path)],
    suite: SuiteOpt = "arith",
    family: FamilyOpt = None,
    split: Annotated[str, typer.Option("--split", help="split of a generated suite or family: train, validation or test (never the one you report on; a file suite has none)")] = "train",
    data: DataOpt = None,
    scorer: ScorerOpt = None,
    n_prompts: Annotated[int, typer.Option("--prompts", help="training prompts to label", min=1)] = 300,
    level: Annotated[Optional[list[int]], typer.Option("--level", help="level of arith or the --family to label (repeatable; all when omitted)")] = None,
    k: Annotated[int, typer.Option("-k", "--samples", help="samples per prompt", min=2, max=64)] = 16,
    temp: Annotated[float, typer.Option("--temp", help="sampling temperature")] = 0.7,
    max_tokens: PoolMaxTokOpt = None,
    cut: Annotated[Optional[list[int]], typer.Option("--cut", help="also emit responses cut at this many tokens (repeatable; default 16 32 64, those below the reply budget)")] = None,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = Path("runs/eval-cache"),
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing dataset")] = False,
    backend: BackendOpt = None,
    backend_model: BackendModelOpt = None,
    concurrency: ConcurrencyOpt = 8,
    backend_wait: BackendWaitOpt = 120.0,
    backend_timeout: BackendTimeoutOpt = 300.0,
) -> None:
    """Sample K responses per training prompt and label each with its self-eval target."""
    from edge_adapt.train import LabelConfig, label_job

    fields = dict(out=out, suite=suite, split=split, data=data, scorer=scorer, n_prompts=n_prompts, levels=level, k=k,
                  temperature=temp, max_tokens=max_tokens, seed=seed, model=model, threads=threads,
                  cache_dir=cache_dir, force=force, family=family, backend=backend, backend_model=backend_model,
                  concurrency=concurrency, backend_wait=backend_wait, backend_timeout=backend_timeout)
    if cut:
        fields["cuts"] = cut
    cfg = validated(LabelConfig, fields, "label")
    t0 = time.perf_counter()
    _show(label_job(cfg))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s")


@app.command("train")
def train_cmd(
    labels: Annotated[list[Path], typer.Argument(help="training labels from `edge-adapt label` (one or more files)")],
    validation: Annotated[list[Path], typer.Option("--validation", help="labels of held-out prompts, validated each epoch (repeatable: merged)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (adapter.gguf or model.gguf, metrics, plot)")],
    method: Annotated[str, typer.Option("--method", help="alora | lora | full")] = "alora",
    target: Annotated[str, typer.Option("--target", help="relative (share of other samples not better) | correct | blend")] = "relative",
    relative_weight: Annotated[float, typer.Option("--relative-weight", help="--target blend only: target = (1 - w) * correct + w * relative")] = 0.3,
    rank_weight: Annotated[float, typer.Option("--rank-weight", help="weight of a listwise loss ranking each prompt's right replies above its wrong ones (0: none)")] = 0.0,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 2,
    init: Annotated[Optional[Path], typer.Option("--init", help="continue from a previous run's checkpoint/ directory or an adapter GGUF")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="learning rate (3e-4 for (a)LoRA, 2e-5 for full)")] = None,
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank (not --method full); above --init's rank, that adapter is grown to it (scores unchanged, more capacity)")] = 8,
    suffix: Annotated[Optional[str], typer.Option("--suffix", help="raw self-eval suffix to train on (default <|im_end|>Restart)")] = None,
    prompts_per_step: Annotated[int, typer.Option("--prompts-per-step", min=1)] = 4,
    lm_loss: Annotated[float, typer.Option("--lm-loss", help="weight of an LM loss on the responses (--method full only)")] = 0.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="stop early (smoke tests)")] = None,
    validate_before: Annotated[bool, typer.Option("--validate-before/--no-validate-before", help="validate the untrained model too")] = True,
    model: ModelOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    force: Annotated[bool, typer.Option("--force", help="overwrite a non-empty output directory")] = False,
) -> None:
    """Train the self-eval adapter (needs the \\[train] extra) and export it to GGUF."""
    from edge_adapt.train.config import TrainConfig
    from edge_adapt.train.trainer import require_train_extra, train_job

    require_train_extra()
    cfg = validated(TrainConfig, dict(
        labels=labels, validation=validation, out=out, method=method, target=target, relative_weight=relative_weight, rank_weight=rank_weight,
        epochs=epochs,
        init=init, lr=lr,
        rank=rank, prompts_per_step=prompts_per_step, lm_loss=lm_loss, max_steps=max_steps, model=model,
        validate_before=validate_before, threads=threads, seed=seed, force=force,
        **({"suffix": suffix} if suffix is not None else {})), "train")
    result = _show(train_job(cfg))
    if not result.main:
        return  # one of several processes (accelerate launch): the main one reports
    best = next(e for e in result.epochs if e.epoch == result.best_epoch)
    def auroc(x: float | None) -> str:  # undefined where the validation prompts are all right or all wrong
        return "n/a" if x is None else f"{x:.3f}"

    typer.echo(f"wrote {result.exported} (best epoch {result.best_epoch} by {result.best_by}: validation AUROC {auroc(best.auroc)}, "
               f"within prompts {auroc(best.within_prompt_auroc)}, Brier {best.brier:.3f} vs constant "
               f"{best.brier_constant:.3f}) in {result.seconds / 60:.1f} min, peak RSS {result.peak_rss_mib:.0f} MiB")


# -- convert / convert-adapter / import: HF <-> GGUF ---------------------------------------------------------
@app.command("convert")
def convert_cmd(
    hf_dir: Path = typer.Argument(..., help="transformers checkpoint directory (config.json, safetensors, tokenizer)"),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF file to write", parser=_file_path),
    type: str = typer.Option("f16", "--type", help="f32|f16|bf16|q8_0|q4_0|q4_1|q4_k_m|q5_k_m|q6_k"),
    merge_adapter: Optional[Path] = typer.Option(None, "--merge-adapter", help="PEFT LoRA directory to merge in"),
    self_eval_config: Optional[Path] = typer.Option(None, "--self-eval-config", help="JSON written as edge_adapt.self_eval.*"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Convert a transformers checkpoint to a GGUF model."""
    from edge_adapt.convert import convert_model_job

    r = _show(convert_model_job(hf_dir, output, type=type, merge_adapter=merge_adapter,
                                self_eval_config=self_eval_config, force=force))
    typer.echo(f"wrote {r.path} ({r.architecture}, {r.type}, {r.n_params / 1e6:.1f}M params, "
               f"{r.file_size / 2**20:.1f} MiB) in {r.seconds:.1f}s")


@app.command("convert-adapter")
def convert_adapter_cmd(
    peft_dir: Path = typer.Argument(..., help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)"),
    base: Path = typer.Option(..., "--base", help="the base model GGUF the adapter will be loaded on"),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF adapter file to write", parser=_file_path),
    self_eval_config: Optional[Path] = typer.Option(None, "--self-eval-config", help="JSON written as edge_adapt.self_eval.*"),
    type: str = typer.Option("f32", "--type", help="f32 | f16"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Convert a PEFT LoRA or activated LoRA to a GGUF adapter."""
    from edge_adapt.convert import convert_adapter_job

    r = _show(convert_adapter_job(peft_dir, base, output, self_eval_config=self_eval_config, type=type, force=force))
    kind = f"aLoRA, invocation tokens {r.invocation_tokens}" if r.invocation_tokens else "LoRA"
    typer.echo(f"wrote {r.path} ({kind}, {r.n_tensors} tensors, alpha {r.alpha:g}) in {r.seconds:.1f}s")


@app.command("import")
def import_cmd(
    model: Optional[Path] = typer.Argument(None, help="GGUF model; the embedded default model when omitted"),
    output: Path = typer.Option(..., "-o", "--output", help="transformers checkpoint directory to write"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Dequantize a GGUF model back to a transformers checkpoint (for fine-tuning)."""
    from edge_adapt.convert import import_gguf_job

    r = _show(import_gguf_job(model, output, force=force))
    typer.echo(f"wrote {r.path} ({r.architecture}, {r.n_params / 1e6:.1f}M params, float32) in {r.seconds:.1f}s")


def main() -> None:
    # Ctrl-C raises KeyboardInterrupt from here on (what a command created is taken back); errors, interrupts
    # and bugs end as one line, as for every entry point (interrupts.entry_point).
    with interrupts.entry_point(lambda: _debug):
        try:
            # typer turns KeyboardInterrupt into Exit(130), which standalone_mode=False returns instead of raising.
            code = app(standalone_mode=False)
        except typer.Exit as exc:
            code = exc.exit_code
        except typer.Abort:
            raise KeyboardInterrupt from None
        except TyperException as exc:  # bad options and arguments, as typer's bundled click reports them
            message = exc.format_message()  # type: ignore[attr-defined]
            if message:  # none after the help that a bare `edge-adapt` prints
                print(f"error: {message}", file=sys.stderr)
            sys.exit(getattr(exc, "exit_code", 2))
        if code == interrupts.EXIT_CODE:
            raise KeyboardInterrupt
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
