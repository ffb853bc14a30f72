"""Memory planning from GGUF metadata alone: how many parallel samples of which context length fit a budget.

The estimate mirrors what llama.cpp allocates for a context made by `Engine`:
- weights: the tensor bytes of the file (memory-mapped; all of them are touched by the first decode);
- KV cache: K and V for every layer, per token, per sequence (f16), over n_seq x ctx cells, where split
  KV rounds each sequence's context up to a multiple of 256 as llama.cpp does and has one spare sequence;
- output buffer: one row of logits per sequence (the engine caps llama.cpp's outputs per batch at that);
- compute buffer: the activations of one full micro-batch (fitted to llama.cpp's reservation, see below);
- the engine's own numpy rows of logits, and the process the model runs in.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from edge_adapt.engine.gguf_file import GGUFInfo
from edge_adapt.engine.handles import MAX_SEQUENCE_IDS
from edge_adapt.errors import BudgetError, UsageError

MiB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
# No machine has a PiB of memory: a larger size is a typo (400 digits reads as infinity, and int() of it raised).
MAX_SIZE = 1 << 50


def _typed(text: str) -> str:
    """What the user typed, for a one-line message: a long text is cut in the middle."""
    return text if len(text) <= 40 else f"{text[:24]}...{text[-12:]}"


def parse_size(text: str) -> int:
    """'1.5GB', '800M', '2GiB' -> bytes (binary units: a laptop's '8 GB' of RAM is 8 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read memory size {_typed(text)!r} (examples: 1.5GB, 800MB, 2GiB)")
    size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(size) or size > MAX_SIZE:
        raise UsageError(f"memory size {_typed(text)!r} is more than any machine has (at most {MAX_SIZE >> 30}GB)")
    return int(size)


def size_text(n: int) -> str:
    """A size the user gave, for a message: in the largest unit it reaches to four digits (1.5 MiB, not 2; 10 GiB,
    not 1.024e+04 MiB: under 1024 of a unit, four digits never turn to an exponent), below one MiB in bytes (a
    budget of 1KB is not '0 MiB')."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", MiB)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"


def shown(value: object) -> str:
    """Text from a GGUF (untrusted) as a terminal should get it: control characters escaped as repr escapes them
    (an ANSI sequence in a name would clear the screen or forge lines), all other text as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def process_rss() -> int:
    """Resident memory of this process now (Linux /proc, else the peak that resource reports)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def peak_rss() -> int:
    """Peak resident memory of this process so far."""
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class Plan:
    """Predicted memory of one engine configuration, in bytes."""

    parallel: int
    ctx: int
    ctx_cells: int
    weights: int
    kv: int
    outputs: int
    compute: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.outputs + self.compute + self.runtime

    def describe(self) -> str:
        parts = [("weights", self.weights), ("KV cache", self.kv), ("compute", self.compute),
                 ("logits", self.outputs), ("runtime", self.runtime)]
        detail = ", ".join(f"{name} {v / MiB:.0f} MiB" for name, v in parts)
        return f"{self.parallel} x {self.ctx} tokens: {self.total / MiB:.0f} MiB ({detail})"


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def sequence_ids(parallel: int, kv_unified: bool) -> int:
    """Sequence ids (with split KV: KV streams) of the context made for `parallel` sequences. Split KV gets one
    spare beyond `parallel`: the engine never holds more than `parallel` sequences, so there is always a free
    stream to move a sequence through when it packs a decode's sequences onto consecutive ids (Engine._pack)."""
    return parallel + 1 if parallel > 2 and not kv_unified else parallel  # two fill their ids: no holes to pack


def most_sequences(kv_unified: bool = False) -> int:
    """The most sequences one context holds: llama.cpp's MAX_SEQUENCE_IDS ids, less split KV's spare."""
    n = MAX_SEQUENCE_IDS
    while sequence_ids(n, kv_unified) > MAX_SEQUENCE_IDS:
        n -= 1
    return n


def check_sequences(parallel: int, kv_unified: bool = False) -> None:
    """Refuse more sequences than one context holds with BudgetError: it is llama.cpp's limit on sequence ids, not
    memory, that no budget lifts."""
    most = most_sequences(kv_unified)
    if parallel > most:
        ids = sequence_ids(parallel, kv_unified)
        spare = "" if kv_unified else (f" ({parallel} sequences take {ids} sequence ids with split KV (one spare): "
                                       f"hold at most {most}; a library engine with a unified KV, "
                                       f"EngineOptions(kv_unified=True), holds {most_sequences(True)})")
        raise BudgetError(f"{parallel} parallel sequences are more than one llama.cpp context holds: at most {most}"
                          f"{spare}")


def plan(
    info: GGUFInfo,
    *,
    parallel: int,
    ctx: int,
    kv_unified: bool = False,
    batch: int = 512,
    runtime: int | None = None,
) -> Plan:
    """Predict the resident memory of `Engine(model, parallel=..., ctx=...)` running on the CPU."""
    if parallel < 1 or ctx < 1:
        raise UsageError("parallel and ctx must be >= 1")
    check_sequences(parallel, kv_unified)  # a plan the engine would refuse is no plan
    ids = sequence_ids(parallel, kv_unified)
    cells = _pad(ctx * parallel, 256) if kv_unified else _pad(ctx, 256) * ids
    kv = info.kv_bytes_per_token_f16 * cells
    # llama.cpp keeps one float row per output (one per sequence id) in its output buffer, and the engine copies
    # each row once.
    outputs = 4 * info.n_vocab * (ids + parallel)
    # Compute buffer: activations of one n_batch micro-batch. Fitted on llama.cpp's reservation for
    # SmolLM2-135M (14.0 MiB at batch 512: 4 bytes x 512 x (6 x 576 + 2 x 1536) = 12.8 MiB, plus
    # attention scratch over the context and the output rows).
    compute = 4 * batch * (6 * info.n_embd + 2 * info.n_ff) + 4 * batch * info.n_head * 32 + 4 * info.n_vocab * parallel
    return Plan(parallel, ctx, cells, info.tensor_bytes, kv, outputs, compute,
                process_rss() if runtime is None else runtime)


def fit(info: GGUFInfo, budget: int, *, ctx: int, want: int | None = None, kv_unified: bool = False,
        batch: int = 512, runtime: int | None = None, fix: str = "lower -n or --ctx") -> Plan:
    """The plan with the most parallel sequences of `ctx` tokens (up to `want`, and to what one context holds:
    most_sequences) that fits `budget` bytes.

    Refuses with BudgetError when not even one sequence, or fewer than `want`, fit, or `want` is more than one
    context holds whatever the memory. `fix`: what lowers `want` or `ctx` in the caller's terms (chat has no -n).
    """
    runtime = process_rss() if runtime is None else runtime
    limit = most_sequences(kv_unified)
    if want is not None:
        check_sequences(want, kv_unified)

    def sized(n: int) -> Plan:
        return plan(info, parallel=n, ctx=ctx, kv_unified=kv_unified, batch=batch, runtime=runtime)

    one = sized(1)
    if one.total > budget:
        raise BudgetError(
            f"--mem-budget {size_text(budget)} is too small: one sequence of {ctx} tokens needs "
            f"{one.total / MiB:.0f} MiB ({one.describe()})"
        )
    # The most sequences that fit, and the fewest that do not or that a context cannot hold (memory grows with
    # the count).
    most, over = 1, limit + 1
    while over - most > 1:
        mid = (most + over) // 2
        most, over = (mid, over) if sized(mid).total <= budget else (most, mid)
    if want is not None and most < want:
        raise BudgetError(
            f"{want} parallel sequences of {ctx} tokens need {sized(want).total / MiB:.0f} MiB;"
            f" --mem-budget {size_text(budget)} fits {most} ({fix})"
        )
    return sized(min(most, want if want is not None else limit))


def model_facts(meta: GGUFInfo, p: Plan) -> dict[str, object]:
    """What `edge-adapt info --json` prints: the model's facts from its GGUF metadata and a memory plan."""
    return {
        "file": str(meta.path), "name": meta.name, "architecture": meta.architecture,
        "parameters": meta.n_params, "quantization": meta.file_type, "tensor_types": meta.tensor_types,
        "layers": meta.n_layers, "embedding": meta.n_embd, "heads": meta.n_head, "kv_heads": meta.n_head_kv,
        "vocabulary": meta.n_vocab, "training_context": meta.n_ctx_train,
        "kv_bytes_per_token": meta.kv_bytes_per_token_f16, "chat_template": bool(meta.chat_template),
        "edge_adapt": meta.edge_adapt,
        "plan": {"parallel": p.parallel, "ctx": p.ctx, "total_bytes": p.total, "weights": p.weights, "kv": p.kv,
                 "compute": p.compute, "logits": p.outputs, "runtime": p.runtime},
    }


def summary(meta: GGUFInfo, p: Plan, budget: int | None = None) -> str:
    """The same, as lines for a person (`edge-adapt info`)."""
    lines = [
        f"{shown(meta.name)}  [{shown(meta.path)}]",
        f"  architecture   {meta.architecture}, {meta.n_params / 1e6:.1f}M parameters, {meta.file_type}"
        f" ({', '.join(f'{k}: {v}' for k, v in meta.tensor_types.items())})",
        f"  shape          {meta.n_layers} layers, {meta.n_embd} wide, {meta.n_head} heads / {meta.n_head_kv} KV heads,"
        f" vocabulary {meta.n_vocab}",
        f"  context        {meta.n_ctx_train} tokens trained; KV {meta.kv_bytes_per_token_f16 / 1024:.1f} KiB per token",
        f"  chat template  {'yes' if meta.chat_template else 'no (ChatML is used)'}",
        *(f"  edge_adapt.{shown(k)} = {shown(v)}" for k, v in meta.edge_adapt.items()),
        f"  plan{f' within {size_text(budget)}' if budget else ''}: {p.describe()}",
    ]
    return "\n".join(lines)


def adapter_facts(meta: GGUFInfo) -> dict[str, object]:
    """What `edge-adapt info --json` prints for a LoRA / aLoRA adapter: its GGUF's facts (it has no memory plan of
    its own; it is loaded beside its model)."""
    ranks = {shape[1] for name, shape in meta.tensor_shapes.items() if name.endswith(".lora_a") and len(shape) == 2}
    # blk.0.attn_q.weight.lora_a adapts attn_q (any name goes: inspect_gguf checked the pairs, not their names)
    targets = sorted({name.removesuffix(".lora_a").removesuffix(".weight").rpartition(".")[2]
                      for name in meta.tensor_shapes if name.endswith(".lora_a")})
    invocation = meta.adapter.get("alora.invocation_tokens")
    return {
        "file": str(meta.path), "name": meta.name, "architecture": meta.architecture,
        "kind": "aLoRA" if invocation else "LoRA", "rank": max(ranks, default=0), "alpha": meta.adapter.get("lora.alpha"),
        "targets": targets, "tensors": len(meta.tensor_shapes), "parameters": meta.n_params,
        "bytes": meta.file_size, "invocation_tokens": list(invocation) if isinstance(invocation, list) else [],
        "edge_adapt": meta.edge_adapt,
    }


def adapter_summary(meta: GGUFInfo) -> str:
    """The same, as lines for a person."""
    f = adapter_facts(meta)
    invoked = f"; switched on by the tokens {f['invocation_tokens']}" if f["invocation_tokens"] else ""
    lines = [
        f"{shown(meta.name)}  [{shown(meta.path)}]",
        f"  adapter        {f['kind']} for a {shown(meta.architecture)} model, rank {f['rank']}, alpha {shown(f['alpha'])}{invoked}",
        f"  adapts         {shown(', '.join(f['targets']))} ({f['tensors']} tensors, {meta.n_params / 1e6:.2f}M parameters, "
        f"{meta.file_size / MiB:.1f} MiB)",
        *(f"  edge_adapt.{shown(k)} = {shown(v)}" for k, v in meta.edge_adapt.items()),
    ]
    return "\n".join(lines)
