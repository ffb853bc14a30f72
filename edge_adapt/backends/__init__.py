"""Where a sample pool's samples and self-eval scores come from (`label`, `eval` and `tune-policy` pools).

`LocalBackend`: the in-process engine (the default). `RemoteBackend`: any OpenAI-compatible server (vLLM,
llama.cpp's llama-server, `edge-adapt serve`) reached over HTTP, for models too big to sample on a laptop.
Both hand the pool code (edge_adapt.eval.pool) finished PromptPools; the cache, its keys and resuming are
the pool's, the same for both.
"""

from edge_adapt.backends.base import PoolBackend
from edge_adapt.backends.local import LocalBackend
from edge_adapt.backends.remote import RemoteBackend, RemoteOptions

__all__ = ["PoolBackend", "LocalBackend", "RemoteBackend", "RemoteOptions"]
