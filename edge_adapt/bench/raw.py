"""Raw llama.cpp, no engine: greedy decode of N forks of one prompt, one `llama_decode` per step for all of them.

This is the hardware's batching gain that a server (or the engine) can at best pass on: tokens/s with N
sequences in each decode against tokens/s with one. Only the owned handles are used (model, context, batch);
sampling is an argmax over each sequence's row of logits, read in llama.cpp's own buffer (no copy), end-of-
generation tokens masked so every sequence runs the full count.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_adapt.engine.chat import render_chat
from edge_adapt.engine.handles import Batch, Context, Model, init_backend

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def _chat_tokens(model: Model, prompt: str) -> list[int]:
    text = render_chat(model.chat_template(), [{"role": "user", "content": prompt}])
    return model.tokenize(text, add_special=True, parse_special=True)


def ragged_lengths(n_seq: int, tokens: int) -> list[int]:
    """Tokens per sequence for a ragged run: from `tokens` down to about half of it, one sequence ending every
    step or two, as samples that stop at different lengths do."""
    return [tokens - i * tokens // (2 * n_seq) for i in range(n_seq)]


def forked_greedy_tok_s(model: Model, prompt: list[int], n_seq: int, tokens: int, threads: int,
                        lengths: list[int] | None = None, offload_kqv: bool = False) -> float:
    """Tokens/s of `n_seq` greedy forks of `prompt`, `tokens` each, decoded together (prompt decode not timed).

    `offload_kqv`: the KV cache on the GPU, as the engine puts it when it offloads layers. With `lengths`,
    sequence i stops after lengths[i] tokens. The longest run on the lowest ids, so the sequences
    still running always hold consecutive ids: one micro-batch per step, the best llama.cpp can do."""
    lengths = sorted(lengths or [tokens] * n_seq, reverse=True)
    ctx = Context(model, n_ctx=(len(prompt) + tokens + 16) * n_seq, n_batch=max(512, len(prompt)), n_seq_max=n_seq,
                  n_threads=threads, kv_unified=False, offload_kqv=offload_kqv)
    batch = Batch(max(512, len(prompt), n_seq))
    try:
        eog = np.array([t for t in range(model.n_vocab) if model.is_eog(t)], dtype=np.int64)
        n = len(prompt)
        want = np.zeros(n, dtype=np.int8)
        want[-1] = 1
        batch.fill(np.array(prompt), np.arange(n), np.zeros(n, dtype=np.int32), want)
        ctx.decode(batch)
        row = ctx.logits_view(1)
        for s in range(1, n_seq):
            ctx.seq_cp(0, s)
        logits = np.repeat(row, n_seq, axis=0)
        seqs = np.arange(n_seq, dtype=np.int32)
        ones = np.ones(n_seq, dtype=np.int8)
        t0 = time.perf_counter()
        for step in range(lengths[0]):
            live = sum(length > step for length in lengths)
            logits = logits[:live]
            logits[:, eog] = -np.inf
            nxt = logits.argmax(axis=1)
            batch.fill(nxt, np.full(live, n + step), seqs[:live], ones[:live])
            ctx.decode(batch)
            logits = ctx.logits_view(live)  # in place: the argmax reads it before the next decode
        return sum(lengths) / (time.perf_counter() - t0)
    finally:
        batch.close()
        ctx.close()


def batching_gain(model_path: Path, n_seq: int = 8, tokens: int = 128, threads: int = 2, repeats: int = 2,
                  prompt: str = PROMPT) -> dict[str, float]:
    """Best-of-`repeats` tokens/s at 1 and at `n_seq` forked sequences on one model load, and their ratio."""
    init_backend()
    model = Model(model_path)
    try:
        toks = _chat_tokens(model, prompt)
        forked_greedy_tok_s(model, toks, n_seq, 8, threads)  # warm-up: graph allocation, page-in of the weights
        one = max(forked_greedy_tok_s(model, toks, 1, tokens, threads) for _ in range(repeats))
        many = max(forked_greedy_tok_s(model, toks, n_seq, tokens, threads) for _ in range(repeats))
    finally:
        model.close()
    return {"n_seq": n_seq, "tokens": tokens, "one_tok_s": one, "many_tok_s": many, "gain": many / one}
