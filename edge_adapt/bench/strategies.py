"""Self-evaluation and strategy benchmarks on one engine, side by side.

Each function measures and returns a dict of numbers; `run_all` runs them in one go and `python -m
edge_adapt.bench.strategies` prints them with the targets of issue 4:

- self-eval cost <= 3% of generation time, 16 samples x 128 tokens
- prune 16 -> 4 at 32 tokens generates <= 40% of the tokens of best-of-16
- best-of-8 wall time <= 0.6 x that of 8 sequential samples + scoring
"""

from __future__ import annotations

import time

from edge_adapt.engine.engine import Engine
from edge_adapt.engine.sampling import SamplingParams
from edge_adapt.result import collect
from edge_adapt.selfeval import SelfEvalConfig, SelfEvaluator
from edge_adapt.strategies import StrategyConfig, run_strategy

LONG_PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."
# Cost reference: the untrained chat-format question (27 tokens for SmolLM2) the shipped adapter replaced.
UNTRAINED = SelfEvalConfig(default_adapter=False)


def selfeval_cost(engine: Engine, n: int = 16, max_tokens: int = 128, prompt: str = LONG_PROMPT,
                  repeats: int = 1) -> dict[str, float]:
    """Generate n samples side by side, then score them all once: time of each, and their ratio. With
    repeats, the same samples (same seeds) are generated and scored again and the fastest of each is kept, so
    a one-off stall of a shared machine (or the first adapter decode's warm-up) does not decide the ratio."""
    ev = SelfEvaluator(engine)  # the model's own self-eval: the shipped adapter and suffix for the default model
    untrained = SelfEvaluator(engine, UNTRAINED)
    gen_s = score_s = untrained_s = float("inf")
    generated = 0
    for _ in range(repeats):
        with engine.opened(engine.tokenize(engine.chat_prompt([{"role": "user", "content": prompt}]))) as root:
            samples = engine.start(root, [SamplingParams(temperature=0.8, seed=i) for i in range(n)],
                                   max_tokens=max_tokens)
            t0 = time.perf_counter()
            for _ in engine.advance(samples):
                pass
            gen_s = min(gen_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            ev.score(samples)
            score_s = min(score_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            untrained.score(samples)
            untrained_s = min(untrained_s, time.perf_counter() - t0)
        generated = sum(len(s.generated) for s in samples)
    return {
        "samples": n,
        "generated_tokens": generated,
        "generation_s": gen_s,
        "suffix_tokens": len(ev.suffix),
        "selfeval_s": score_s,
        "selfeval_ratio": score_s / gen_s,
        "untrained_suffix_tokens": len(untrained.suffix),
        "untrained_selfeval_s": untrained_s,
        "untrained_selfeval_ratio": untrained_s / gen_s,
        "repeats": repeats,
    }


def prune_vs_best_of_n(
    engine: Engine, n: int = 16, k: int = 4, at: int = 32, max_tokens: int = 128, prompt: str = LONG_PROMPT,
    repeats: int = 1,
) -> dict[str, float]:
    """best-of-n and prune n -> k at `at` tokens on the same prompt and seeds: tokens generated and wall time,
    the two alternating `repeats` times, the fastest of each kept (the same seeds give the same tokens)."""
    common = dict(budget=n, max_tokens=max_tokens, temperature=0.8)
    scorer = SelfEvaluator(engine)
    bon_s = prune_s = float("inf")
    for _ in range(repeats):
        bon = collect(run_strategy(engine, prompt, StrategyConfig(strategy="best-of-n", **common), scorer)).usage
        pr = collect(run_strategy(engine, prompt, StrategyConfig(strategy="prune", k=k, prune_at=(at,), **common),
                                  scorer)).usage
        bon_s, prune_s = min(bon_s, bon.wall_s), min(prune_s, pr.wall_s)
    return {
        "max_tokens": max_tokens,
        "best_of_n_tokens": bon.generated_tokens,
        "prune_tokens": pr.generated_tokens,
        "token_ratio": pr.generated_tokens / bon.generated_tokens,
        "token_ratio_if_none_ends_early": (n * at + k * (max_tokens - at)) / (n * max_tokens),
        "best_of_n_s": bon_s,
        "prune_s": prune_s,
        "wall_ratio": prune_s / bon_s,
        "prune_selfeval_tokens": pr.selfeval_tokens,
        "repeats": repeats,
    }


def batched_vs_sequential(engine: Engine, n: int = 8, max_tokens: int = 128, prompt: str = LONG_PROMPT,
                          repeats: int = 1) -> dict[str, float]:
    """best-of-n (samples side by side, one batched scoring) against the same n samples (same seeds) one
    after another, each scored on its own. The prompt is decoded once in both. The two alternate `repeats`
    times and the fastest of each is kept."""
    scorer = SelfEvaluator(engine)
    cfg = StrategyConfig(strategy="best-of-n", budget=n, max_tokens=max_tokens, temperature=0.8)
    batched_s = seq_s = float("inf")
    for _ in range(repeats):
        batched = collect(run_strategy(engine, prompt, cfg, scorer)).usage
        batched_s = min(batched_s, batched.wall_s)
        t0 = time.perf_counter()
        generated = 0
        with engine.opened(engine.tokenize(engine.chat_prompt([{"role": "user", "content": prompt}]))) as root:
            for i in range(n):
                (s,) = engine.start(root, [SamplingParams(temperature=0.8, seed=i)], max_tokens=max_tokens, first_index=i)
                for _ in engine.advance([s]):
                    pass
                scorer.score([s])
                generated += len(s.generated)
                engine.release(s.seq)
        seq_s = min(seq_s, time.perf_counter() - t0)
    return {
        "samples": n,
        "batched_tokens": batched.generated_tokens,
        "sequential_tokens": generated,
        "batched_s": batched_s,
        "sequential_s": seq_s,
        "wall_ratio": batched_s / seq_s,
        "repeats": repeats,
    }


def run_all(engine: Engine | None = None, *, threads: int | None = None, quick: bool = False,
            repeats: int = 1) -> dict[str, dict[str, float]]:
    """Every benchmark on one engine (the default model unless one is given)."""
    own = engine is None
    e = engine or Engine(parallel=17, ctx=512, threads=threads)
    try:
        tok = 32 if quick else 128
        out = {"selfeval_cost": selfeval_cost(e, max_tokens=tok, repeats=repeats)}
        for mt in (tok,) if quick else (128, 256):
            out[f"prune_16_to_4_at_32_max{mt}"] = prune_vs_best_of_n(e, max_tokens=mt, at=min(32, mt // 2),
                                                                     repeats=repeats)
        out["best_of_8_vs_sequential"] = batched_vs_sequential(e, max_tokens=tok, repeats=repeats)
        return out
    finally:
        if own:
            e.close()


TARGETS = {
    ("selfeval_cost", "selfeval_ratio"): 0.03,
    ("prune_16_to_4_at_32_max128", "token_ratio"): 0.40,
    ("prune_16_to_4_at_32_max256", "token_ratio"): 0.40,
    ("best_of_8_vs_sequential", "wall_ratio"): 0.60,
}


def render(results: dict[str, dict[str, float]]) -> str:
    lines = []
    for name, numbers in results.items():
        lines.append(name)
        for key, value in numbers.items():
            target = TARGETS.get((name, key))
            mark = "" if target is None else f"   target <= {target:.2f}: {'met' if value <= target else 'NOT met'}"
            lines.append(f"  {key:32s} {value:10.4g}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)")
    ap.add_argument("--quick", action="store_true", help="32-token samples: a smoke run, not the targets' setting")
    args = ap.parse_args(argv)
    print(render(run_all(threads=args.threads, quick=args.quick)))


if __name__ == "__main__":
    main()
