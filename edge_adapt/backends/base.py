"""The one interface the pool code samples through."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edge_adapt.engine.chat import Message
from edge_adapt.engine.gguf_file import GGUFInfo

if TYPE_CHECKING:
    from edge_adapt.eval.pool import PoolSettings, PromptPool
    from edge_adapt.tasks.base import Problem, Suite


class PoolBackend(Protocol):
    """Makes PromptPools: K samples (and a greedy one) per prompt, each scored by self-evaluation at the prune
    points and at the end."""

    @property
    def fingerprint(self) -> str:
        """The model that samples, as cache keys name it: local and remote pools never share a key."""
        ...

    @property
    def identity(self) -> str:
        """The fingerprint and the self-evaluation's identity (adapter, suffix): what a pool's key holds."""
        ...

    @property
    def model_path(self) -> Path:
        """The local GGUF (for a server: the one whose vocabulary and chat template render its prompts)."""
        ...

    @property
    def info(self) -> GGUFInfo:
        """The model's GGUF description (the local file's, for a server)."""
        ...

    def chat_prompt(self, messages: list[Message]) -> str:
        """A conversation as the model's chat template renders it (always locally)."""
        ...

    def generate(self, work: Sequence[tuple[Problem, str]], suite: Suite,
                 settings: PoolSettings) -> Iterator[PromptPool]:
        """The pools of (problem, cache key) pairs, each yielded as soon as it is done (any order)."""
        ...

    def rescore(self, settings: PoolSettings, key: str, other: PromptPool) -> PromptPool:
        """`other`'s samples (recorded token ids) scored by this backend's self-evaluation."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> PoolBackend: ...

    def __exit__(self, *exc: object) -> None: ...
