"""LoRA adapter GGUFs for the embedded model (and for models that are not it), written for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_lora(path: Path, *, rank: int = 8, seed: int = 0, invocation=None, meta=None, n_embd: int = 576,
              n_embd_kv: int = 192, n_blocks: int = 30, alpha: float | None = None) -> Path:
    """A random LoRA (or aLoRA) on attn_q / attn_v of every block of SmolLM2-135M (by default: other sizes
    make one for a model of the same architecture that is not this one, as SmolLM2-360M's 960 / 320 / 32)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank) if alpha is None else alpha)
    if invocation:
        w.add_key_value(  # llama.cpp accepts only a uint32 array here
            "adapter.alora.invocation_tokens", [int(t) for t in invocation],
            gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32,
        )
    for k, v in (meta or {}).items():
        w.add_string(f"edge_adapt.{k}", v)
    for b in range(n_blocks):
        for name, n_out in (("attn_q", n_embd), ("attn_v", n_embd_kv)):
            w.add_tensor(f"blk.{b}.{name}.weight.lora_a", (rng.standard_normal((rank, n_embd)) * 0.05).astype(np.float32))
            w.add_tensor(f"blk.{b}.{name}.weight.lora_b", (rng.standard_normal((n_out, rank)) * 0.05).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
