"""edge-adapt: adaptive inference-time compute for small local models on llama.cpp.

The library a desktop app embeds; the `edge-adapt` command line is a thin layer over it.

    from edge_adapt import Engine, SamplingParams, Token

    with Engine(parallel=4, ctx=1024) as engine:           # the embedded SmolLM2-135M unless model=... is given
        prompt = engine.chat_tokens([{"role": "user", "content": "What is 12 + 7?"}])
        for event in engine.generate(prompt, SamplingParams(temperature=0.7), n=4, max_tokens=64):
            if isinstance(event, Token):
                print(event.sample, event.text)
        # engine.cancel() from another thread ends a generation with finish reason "cancelled"
"""

# libllama must be loaded before numpy's and pydantic-core's extension modules: with them loaded first, a CUDA
# build of llama-cpp-python 0.3.36 (H100, Ubuntu 24.04 image) segfaults in std::regex while loading the
# vocabulary (reproduced by importing either first; importing llama_cpp first fixes it). Every entry point
# (library, CLI) passes through this file first. An app that imports numpy before edge_adapt should import
# llama_cpp.llama_cpp first itself.
# Ctrl-C while the command line starts up (the imports below take a while) ends it with one line, not a
# traceback from inside an import; a library user's process is left alone (see interrupts.py).
from edge_adapt.interrupts import install_early_if_cli  # noqa: I001

install_early_if_cli()

import llama_cpp.llama_cpp  # noqa: F401, I001

from edge_adapt.engine import (
    GREEDY,
    Cancelled,
    Done,
    Engine,
    EngineOptions,
    Event,
    Finished,
    SampleStarted,
    SamplingParams,
    Token,
    Usage,
)
from edge_adapt.errors import EdgeAdaptError
from edge_adapt.result import Collector, Result, collect
from edge_adapt.session import ChatSession
from edge_adapt.strategies import Chosen, StrategyConfig, run_strategy

__all__ = [
    "Engine", "EngineOptions", "SamplingParams", "GREEDY", "ChatSession", "StrategyConfig", "run_strategy",
    "Event", "SampleStarted", "Token", "Finished", "Done", "Usage", "Chosen", "Cancelled", "EdgeAdaptError",
    "collect", "Collector", "Result",
]
