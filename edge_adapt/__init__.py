"""edge-adapt: adaptive inference-time compute for small local models on llama.cpp.

The library a desktop app embeds; the `edge-adapt` command line is a thin layer over it.

    from edge_adapt import Engine, SamplingParams, Token

    with Engine(parallel=4, ctx=1024) as engine:           # the embedded SmolLM2-135M unless model=... is given
        prompt = engine.chat_prompt([{"role": "user", "content": "What is 12 + 7?"}])
        for event in engine.generate(prompt, SamplingParams(temperature=0.7), n=4, max_tokens=64):
            if isinstance(event, Token):
                print(event.sample, event.text)
        # engine.cancel() from another thread ends a generation with finish reason "cancelled"
"""

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
from edge_adapt.session import ChatSession
from edge_adapt.strategies import Chosen, StrategyConfig, run_strategy

__all__ = [
    "Engine", "EngineOptions", "SamplingParams", "GREEDY", "ChatSession", "StrategyConfig", "run_strategy",
    "Event", "SampleStarted", "Token", "Finished", "Done", "Usage", "Chosen", "Cancelled", "EdgeAdaptError",
]
