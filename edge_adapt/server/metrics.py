"""The scheduler's metrics as Prometheus text (exposition format 0.0.4): `edge_adapt_<key>`, counters for the
keys ending in `_total`, gauges for the rest."""

from __future__ import annotations

from collections.abc import Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HELP = {
    "requests_queued": "Requests waiting to be admitted.",
    "requests_running": "Requests whose sequences are being decoded.",
    "live_sequences": "Engine sequences in use (prompts, samples, cached prefixes excluded).",
    "decode_steps_total": "Batched decode steps run.",
    "decode_step_sequences_total": "Sequences decoded, summed over decode steps.",
    "last_step_sequences": "Sequences in the last decode step.",
    "max_step_sequences": "Most sequences decoded in one step.",
    "tokens_generated_total": "Tokens generated for replies.",
    "selfeval_tokens_total": "Self-evaluation suffix tokens decoded.",
    "prompt_tokens_decoded_total": "Prompt tokens decoded (reused prefixes excluded).",
    "kv_cells_used": "KV cache cells in use.",
    "prefix_cache_hits_total": "Requests that reused a cached prompt prefix.",
    "prefix_tokens_reused_total": "Prompt tokens taken from the prefix cache instead of decoded.",
    "prefix_cache_entries": "Prompt prefixes held in the cache.",
    "sequences_capacity": "Sequences the engine holds (--parallel).",
    "requests_total": "Requests admitted.",
    "requests_failed_total": "Requests that ended in an error.",
    "requests_cancelled_total": "Requests cancelled (client gone) before they ended.",
}


def render(metrics: Mapping[str, float]) -> str:
    lines = []
    for key in sorted(metrics):
        name = f"edge_adapt_{key}"
        kind = "counter" if key.endswith("_total") else "gauge"
        value = metrics[key]
        lines += [f"# HELP {name} {HELP.get(key, key.replace('_', ' ') + '.')}", f"# TYPE {name} {kind}",
                  f"{name} {int(value) if float(value).is_integer() else value}"]
    return "\n".join(lines) + "\n"
