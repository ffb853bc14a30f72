"""Side-by-side benchmarks: the engine against llama-cpp-python's high-level API (engine.py), and the
self-evaluation strategies against their sequential equivalents (strategies.py). `run_job` picks sections and
reports each one as it ends (a full run takes minutes)."""

from __future__ import annotations

from typing import Any

from edge_adapt.errors import UsageError
from edge_adapt.progress import Job, Progress, to_the_end

def _strategies(cfg: Any) -> dict[str, Any]:
    from edge_adapt.bench import strategies as strategy_bench
    from edge_adapt.engine import Engine

    with Engine(model=cfg.model, parallel=17, ctx=512, threads=cfg.threads, device=cfg.device) as e:
        return strategy_bench.run_all(e, repeats=cfg.repeats)


def run_job(cfg: Any, sections: set[str] | None = None) -> Job[dict[str, Any]]:
    """The chosen sections (all when None) of `edge-adapt bench` with `cfg` (engine.BenchConfig), in the order of
    engine.SECTIONS, then strategies. Yields a Progress as each section starts (`info`: its name) and one as it
    ends, whose `message` is its result as `render` prints it; returns every result, under "config" the settings
    they were measured with."""
    from edge_adapt.bench import engine as engine_bench

    every = {**engine_bench.SECTIONS, "strategies": _strategies}
    sections = set(sections or every)
    if not sections <= set(every):
        raise UsageError(f"--only takes {', '.join(sorted(every))}; got {', '.join(sorted(sections - set(every)))}")
    engine_bench.check_config(cfg)
    chosen = [name for name in every if name in sections]
    results: dict[str, Any] = {"config": engine_bench.config_json(cfg)}
    for i, name in enumerate(chosen):
        yield Progress("bench", i, len(chosen), info=name)
        results[name] = every[name](cfg)
        yield Progress("bench", i + 1, len(chosen), info=name, message=render({name: results[name]}))
    return results


run = to_the_end(run_job)


def render(results: dict[str, Any]) -> str:
    from edge_adapt.bench import engine as engine_bench
    from edge_adapt.bench import strategies as strategy_bench

    parts = [engine_bench.render(results)] if set(results) - {"strategies", "config"} else []
    if "strategies" in results:
        parts.append(strategy_bench.render(results["strategies"]))
    return "\n".join(parts)
