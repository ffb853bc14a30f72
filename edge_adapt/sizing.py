"""Engine sizing: how many sequences of how many tokens a job needs, and an engine of that size, checked against
a memory budget before any weights are loaded. `edge-adapt run`, `chat`, `eval`, `label` and `tune-policy` all
size their engines here, from exact token counts (a `Vocab` reads the tokenizer without the weights) and the
strategies' own declarations (StrategySpec.samples_at_once / tokens_per_sequence)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from edge_adapt.engine import Engine, EngineOptions, Vocab
from edge_adapt.engine.budget import fit, most_sequences, parse_size
from edge_adapt.engine.engine import MIN_CTX
from edge_adapt.engine.gguf_file import GGUFInfo, inspect_gguf
from edge_adapt.errors import ContextOverflowError, UsageError, check_count, is_whole
from edge_adapt.strategies.config import StrategyConfig
from edge_adapt.strategies.run import Prompt, RunPlan, plan_run, prompt_tokens

CELLS = 256  # llama.cpp gives a sequence its context in multiples of 256 cells


def round_ctx(tokens: int) -> int:
    """A sequence's context for `tokens` tokens, rounded up as llama.cpp rounds its cells."""
    return max(CELLS, -(-tokens // CELLS) * CELLS)


@dataclass(frozen=True)
class EngineSize:
    sequences: int
    ctx: int  # tokens per sequence
    # When the program sized the context (no --ctx given): the tokens a sequence needs, before rounding, and what
    # needs them in the user's terms. load_engine refuses a context past the model's training naming it, where the
    # engine could only name --ctx, a flag eval, label and tune-policy do not have.
    needs: tuple[int, str] | None = field(default=None, compare=False)

    def covers(self, other: EngineSize) -> bool:
        """Holds what `other` was sized for: its sequences, and its context (what it needs, where the program
        sized it: its rounded context may have been cut to the model's training context)."""
        return self.sequences >= other.sequences and self.ctx >= (other.needs[0] if other.needs else other.ctx)


def load_engine(size: EngineSize, options: EngineOptions | None = None, *, mem_budget: int | str | None = None,
                info: GGUFInfo | None = None, fix: str = "lower -n or --ctx") -> Engine:
    """An engine of `size` with the rest of `options` (model, device, threads ...), refused with BudgetError
    before loading when its memory plan does not fit `mem_budget` (bytes, or a size such as '1.5GB'), or with
    ContextOverflowError when what it was sized for (`size.needs`) is longer than the model was trained for.
    `info`: the model's GGUF facts, when the caller has read them already (a Vocab has); `fix`: what makes the
    engine smaller, in the caller's terms."""
    opts = sized_options(size, options)
    if size.needs is not None:
        if info is None:
            from edge_adapt.engine.default_model import default_model_path

            info = inspect_gguf(opts.model or default_model_path())
        opts = opts.model_copy(update={"ctx": trained_ctx(size, info)})
    check_budget(opts, mem_budget, info, fix=fix)
    return Engine(opts)


def sized_options(size: EngineSize, options: EngineOptions | None = None) -> EngineOptions:
    """`options` (model, device, threads ...) for an engine of `size`."""
    return (options or EngineOptions()).model_copy(update={"parallel": size.sequences, "ctx": size.ctx})


def check_budget(opts: EngineOptions, mem_budget: int | str | None, info: GGUFInfo | None = None, *,
                 fix: str = "lower -n or --ctx") -> None:
    """Refuse an engine of `opts` whose memory plan does not fit `mem_budget` (bytes, or a size such as '1.5GB';
    None: no budget) with BudgetError, from the GGUF's metadata alone: no weights are loaded, so a server can
    check it before it binds its port. `info`: the model's GGUF facts, when the caller has read them already
    (reading them scans the whole file)."""
    if mem_budget is None:
        return
    if not isinstance(mem_budget, str) and (not is_whole(mem_budget) or mem_budget < 1):  # True read as 1 byte
        raise UsageError(f"mem_budget is a number of bytes or a size such as '1.5GB', got {mem_budget!r:.40}")
    budget = parse_size(mem_budget) if isinstance(mem_budget, str) else mem_budget
    if info is None:
        from edge_adapt.engine.default_model import default_model_path

        info = inspect_gguf(opts.model or default_model_path())
    fit(info, budget, ctx=opts.ctx, want=opts.parallel, kv_unified=opts.kv_unified, batch=opts.batch, fix=fix)


def strategy_sequences(plan: RunPlan, *, kv_unified: bool = False) -> int:
    """The engine sequences a run of `plan` holds at once (its samples and the prompt's), refused with UsageError
    in the budget's terms when one llama.cpp context cannot hold them: the budget's range alone does not count the
    prompt's sequence (nor lookahead's rollouts), and the engine's own refusal names a fix no front end offers."""
    most = most_sequences(kv_unified)
    if plan.sequences <= most:
        return plan.sequences

    def holds(budget: int) -> bool:  # a budget the strategy takes (lookahead's is a multiple of its width) that fits
        try:
            return plan.spec.samples_at_once(plan.config.with_options(budget=budget)) < most
        except UsageError:
            return False

    largest = next((b for b in range(plan.config.budget - 1, 0, -1) if holds(b)), None)
    raise UsageError(f"strategy {plan.config.strategy} with budget {plan.config.budget} holds {plan.sequences} "
                     f"sequences at once (its samples and the prompt's), more than one llama.cpp context holds "
                     f"({most})" + (f": its largest budget is {largest}" if largest else ""))


def for_strategy(model: Any, prompt: Prompt, config: StrategyConfig, *, ctx: int | None = None,
                 kv_unified: bool = False) -> tuple[EngineSize, RunPlan]:
    """The engine one strategy run needs (the prompt's sequence and the samples it holds at once, each with room
    for the prompt, its longest generation and the self-evaluation suffix), and the run's plan. `ctx` given
    by the user wins over the computed context."""
    plan = plan_run(model, prompt, config)
    sequences = strategy_sequences(plan, kv_unified=kv_unified)
    if ctx is not None:
        return EngineSize(sequences, ctx), plan
    needs = (plan.tokens_per_sequence, f"the prompt ({len(plan.prompt)} tokens), max_tokens {config.max_tokens} and the "
             "self-evaluation suffix")
    return EngineSize(sequences, round_ctx(plan.tokens_per_sequence), needs), plan


def engine_for_strategy(prompt: Prompt, config: StrategyConfig | Mapping[str, Any],
                        options: EngineOptions | None = None, *, ctx: int | None = None,
                        mem_budget: int | str | None = None) -> tuple[Engine, RunPlan]:
    """An engine sized for one strategy run on `prompt`, and the run's plan (`run_strategy(engine, plan.prompt,
    plan.config)`). `config` as run_strategy takes it. Token counts come from the model's tokenizer, read without
    its weights."""
    config = StrategyConfig.from_caller(config, "config")  # refused as run_strategy refuses it, before loading
    options = options or EngineOptions()
    with Vocab(options.model) as vocab:
        size, plan = for_strategy(vocab, prompt, config, ctx=ctx, kv_unified=options.kv_unified)
    return load_engine(size, options, mem_budget=mem_budget, info=vocab.info), plan


def engine_for_generation(prompt: Prompt, n: int, max_tokens: int, options: EngineOptions | None = None, *,
                          raw: bool = False, ctx: int | None = None,
                          mem_budget: int | str | None = None) -> tuple[Engine, list[int]]:
    """An engine sized for `n` samples of `max_tokens` from `prompt`, and the prompt's tokens (`raw`: a str
    prompt as it is, with the model's BOS, instead of a chat turn)."""
    options = options or EngineOptions()
    with Vocab(options.model) as vocab:
        tokens = vocab.tokenize(prompt, add_bos=True) if raw and isinstance(prompt, str) else prompt_tokens(vocab, prompt)
    return load_engine(for_generation(tokens, n, max_tokens, ctx=ctx, kv_unified=options.kv_unified), options,
                       mem_budget=mem_budget, info=vocab.info), tokens


def trained_ctx(size: EngineSize, info: GGUFInfo) -> int:
    """The context to ask for a program-sized `size` (one with `needs`): refused in the user's terms when what it
    was sized for is longer than the model was trained for (a --ctx given is checked by Engine, as such), and
    the training context itself where rounding up to llama.cpp's cells passed it (a model trained for a context
    that is not a multiple of 256)."""
    assert size.needs is not None
    needed, what = size.needs
    if needed > info.n_ctx_train > 0:
        raise ContextOverflowError(f"{what} need {needed} tokens, more than the model's training context of "
                                   f"{info.n_ctx_train}")
    return default_ctx(size.ctx, info)


def default_ctx(preferred: int, info: GGUFInfo) -> int:
    """A context the user did not give: `preferred`, or the model's training context where that is shorter (a
    default never exceeds what the model was trained for; only a --ctx given is refused), but never below the
    engine's least: a model trained for fewer tokens is then refused for what it is (check_training_context),
    not with a `ctx` the user never gave."""
    return max(MIN_CTX, min(preferred, info.n_ctx_train)) if info.n_ctx_train > 0 else preferred


def for_generation(prompt: Seq[int], n: int, max_tokens: int, *, ctx: int | None = None,
                   kv_unified: bool = False) -> EngineSize:
    """Plain sampling: n samples forked from one prompt (the last takes the prompt's own sequence)."""
    # Checked here, in the caller's terms: the engine would blame `parallel` (or accept a negative max_tokens).
    check_count("n", n)
    check_count("max_tokens", max_tokens)
    if n > most_sequences(kv_unified):
        raise UsageError(f"n ({n}) is more samples than one llama.cpp context holds at once "
                         f"({most_sequences(kv_unified)})")
    if ctx is not None:
        return EngineSize(n, ctx)
    return EngineSize(n, round_ctx(len(prompt) + max_tokens),
                      (len(prompt) + max_tokens, f"the prompt ({len(prompt)} tokens) and max_tokens {max_tokens}"))


def for_pool(longest: int, k: int, max_tokens: int, suffix: int, *, extra: Iterable[EngineSize] = (),
             prompt: str | None = None) -> EngineSize:
    """A sample pool (eval, label, tune-policy): the prompt, its K samples and the greedy one at once, each with
    room for the longest prompt, max_tokens and the scorer's suffix; `extra` sizes (live strategy runs on the
    same engine) are covered too. `prompt`: the longest prompt's id, for a message that it is too long."""
    which = f"the longest prompt ({prompt!r}, {longest} tokens)" if prompt else f"the longest prompt ({longest} tokens)"
    tail = f" and the self-evaluation suffix ({suffix} tokens)" if suffix else ""
    pool = EngineSize(k + 2, round_ctx(longest + max_tokens + suffix),
                      (longest + max_tokens + suffix, f"{which}, max_tokens {max_tokens}{tail}"))
    sizes = [pool, *extra]
    widest = max(sizes, key=lambda s: s.ctx)
    return EngineSize(max(s.sequences for s in sizes), widest.ctx, widest.needs)


def ensure(engine: Engine, size: EngineSize) -> None:
    """Grow an engine that holds no sequences to at least `size` (a scorer turned out to need a longer suffix
    than the engine was sized with)."""
    ctx = size.ctx if size.needs is None else trained_ctx(size, engine.info)  # refused as load_engine refuses
    have = EngineSize(engine.options.parallel, engine.n_ctx_seq)
    if not have.covers(size):
        engine.resize(parallel=max(have.sequences, size.sequences), ctx=max(engine.options.ctx, ctx))
