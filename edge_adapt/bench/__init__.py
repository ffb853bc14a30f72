"""Side-by-side benchmarks: the engine against llama-cpp-python's high-level API (engine.py), and the
self-evaluation strategies against their sequential equivalents (strategies.py). `run` picks sections."""

from __future__ import annotations

from typing import Any

from edge_adapt.errors import UsageError

SECTIONS = ("single_stream", "batched", "fork", "rss", "raw", "profile", "clients", "strategies")


def run(cfg: Any, sections: set[str] | None = None) -> dict[str, Any]:
    """The chosen sections (all when None) of `edge-adapt bench` with `cfg` (engine.BenchConfig)."""
    from edge_adapt.bench import engine as engine_bench
    from edge_adapt.bench import strategies as strategy_bench

    sections = set(sections or SECTIONS)
    if not sections <= set(SECTIONS):
        raise UsageError(f"--only takes {', '.join(sorted(SECTIONS))}; got {', '.join(sorted(sections - set(SECTIONS)))}")
    results: dict[str, Any] = {}
    if sections - {"strategies"}:
        results = engine_bench.run_all(cfg, sections - {"strategies"})
    if "strategies" in sections:
        from edge_adapt.engine import Engine

        with Engine(model=cfg.model, parallel=17, ctx=512, threads=cfg.threads, device=cfg.device) as e:
            results["strategies"] = strategy_bench.run_all(e, repeats=cfg.repeats)
    return results


def render(results: dict[str, Any]) -> str:
    from edge_adapt.bench import engine as engine_bench
    from edge_adapt.bench import strategies as strategy_bench

    parts = [engine_bench.render(results)] if set(results) - {"strategies", "config"} else []
    if "strategies" in results:
        parts.append(strategy_bench.render(results["strategies"]))
    return "\n".join(parts)
