"""The batched multi-sequence engine over llama.cpp's low-level API."""

from edge_adapt.engine.engine import Engine, EngineOptions, Sample, Sequence, Snapshot
from edge_adapt.engine.events import Cancelled, Done, Event, Finished, SampleStarted, Token, Usage
from edge_adapt.engine.sampling import GREEDY, SamplingParams
from edge_adapt.engine.vocab import Vocab

__all__ = [
    "Engine", "EngineOptions", "Vocab", "Sample", "Sequence", "Snapshot", "SamplingParams", "GREEDY",
    "Event", "SampleStarted", "Token", "Finished", "Done", "Usage", "Cancelled",
]
