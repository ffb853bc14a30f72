"""The cost of sampling through a server: `edge-adapt label` on N prompts x K samples through `--backend` on a
local `edge-adapt serve` against the same labelling with the in-process engine, on the same machine in the
same run, the same threads for the model, and the label files compared sample for sample.

    python -m edge_adapt.bench.backend [--prompts 40] [-k 16] [--concurrency 17] [--json F]

The in-process run forks K+1 sequences from one decoded prompt and decodes them in one batch per step. The
remote run sends K+1 requests per prompt (one per sample seed, see edge_adapt.backends.remote), `--concurrency`
at a time, which the server decodes together; what differs is HTTP and JSON, the client process beside the
server on the same cores, and each request decoding its own copy of the prompt where the prefix cache has not
got it yet. Each run starts from an empty cache; the server's start is not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_adapt.bench import servers as srv
from edge_adapt.bench.serve import machine
from edge_adapt.errors import EdgeAdaptError, check_count, validated


def label_once(out_dir: Path, *, prompts: int, k: int, max_tokens: int, threads: int, model: Path | None,
               backend: str | None = None, concurrency: int = 8) -> tuple[float, Path]:
    from edge_adapt.train import LabelConfig
    from edge_adapt.train.labels import label

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = validated(LabelConfig, dict(out=out_dir / "labels.jsonl", cache_dir=out_dir / "cache", n_prompts=prompts,
                                      k=k, max_tokens=max_tokens, threads=threads, model=model, backend=backend,
                                      concurrency=concurrency), "label")
    t0 = time.perf_counter()
    path = label(cfg)
    return time.perf_counter() - t0, Path(path)


def _samples(path: Path) -> dict[str, list[list[int]]]:
    lines = path.read_text().splitlines()[1:]
    return {p["problem_id"]: [r["ids"] for r in p["rows"] if r["cut"] is None] for p in map(json.loads, lines)}


def run(prompts: int, k: int, max_tokens: int, threads: int, concurrency: int, parallel: int,
        model: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edge-adapt-backend-bench-") as tmp:
        root = Path(tmp)
        local_s, local_file = label_once(root / "local", prompts=prompts, k=k, max_tokens=max_tokens,
                                         threads=threads, model=model)
        with srv.edge_adapt_server(model, parallel=parallel, ctx=512, threads=threads) as server:
            remote_s, remote_file = label_once(root / "remote", prompts=prompts, k=k, max_tokens=max_tokens,
                                               threads=threads, model=model, backend=server.url,
                                               concurrency=concurrency)
            m = srv.metrics(server.url)
        a, b = _samples(local_file), _samples(remote_file)
        tokens = sum(len(ids) for rows in a.values() for ids in rows)
    steps = m.get("edge_adapt_decode_steps_total", 0.0)
    return {
        "machine": machine(),
        "config": {"prompts": prompts, "k": k, "max_tokens": max_tokens, "threads": threads,
                   "concurrency": concurrency, "server_parallel": parallel},
        "local": {"wall_s": round(local_s, 2), "prompts_per_s": round(prompts / local_s, 3),
                  "tok_s": round(tokens / local_s, 1)},
        "remote": {"wall_s": round(remote_s, 2), "prompts_per_s": round(prompts / remote_s, 3),
                   "tok_s": round(tokens / remote_s, 1), "requests": m.get("edge_adapt_requests_total"),
                   "sequences_per_step": round(m.get("edge_adapt_decode_step_sequences_total", 0.0) / steps, 2)
                   if steps else None,
                   "prompt_tokens_decoded": m.get("edge_adapt_prompt_tokens_decoded_total"),
                   "prefix_tokens_reused": m.get("edge_adapt_prefix_tokens_reused_total")},
        "tokens_sampled": tokens,
        "same_samples": a == b,
        "remote_over_local_wall": round(remote_s / local_s, 3),
    }


def render(r: dict[str, Any]) -> str:
    c, lo, re_ = r["config"], r["local"], r["remote"]
    return "\n".join([
        f"machine {r['machine']}; {c['prompts']} prompts x K={c['k']} (+ greedy), max {c['max_tokens']} tokens, "
        f"{c['threads']} threads",
        f"in process            {lo['wall_s']:>7.1f} s  {lo['prompts_per_s']:.3f} prompts/s  {lo['tok_s']:.1f} tok/s",
        f"--backend (serve -n {c['server_parallel']}, --concurrency {c['concurrency']}) {re_['wall_s']:>7.1f} s  "
        f"{re_['prompts_per_s']:.3f} prompts/s  {re_['tok_s']:.1f} tok/s  ({re_['requests']:.0f} requests, "
        f"{re_['sequences_per_step']} sequences per step, {re_['prompt_tokens_decoded']:.0f} prompt tokens decoded, "
        f"{re_['prefix_tokens_reused']:.0f} reused)",
        f"HTTP path / in process: {r['remote_over_local_wall']:.2f}x the wall time; samples identical: "
        f"{r['same_samples']}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_adapt.bench.backend", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("-k", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: one prompt's K+1)")
    p.add_argument("--parallel", type=int, default=None, help="the server's sequences (default: concurrency + 1)")
    p.add_argument("--model", type=Path)
    p.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    try:
        for flag, value in (("--concurrency", a.concurrency), ("--parallel", a.parallel)):
            if value is not None:  # 0 is refused as --prompts 0 is, not taken for the default
                check_count(flag, value)
        concurrency = a.k + 1 if a.concurrency is None else a.concurrency
        res = run(a.prompts, a.k, a.max_tokens, a.threads, concurrency,
                  concurrency + 1 if a.parallel is None else a.parallel, a.model)
    except EdgeAdaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(render(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["same_samples"] else 1


if __name__ == "__main__":
    sys.exit(main())
