"""The in-process engine as a pool backend: one prompt at a time, its K samples forked and decoded together."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_adapt.engine import Engine
from edge_adapt.engine.chat import Message
from edge_adapt.engine.gguf_file import GGUFInfo

if TYPE_CHECKING:
    from edge_adapt.eval.pool import PoolSettings, PromptPool, SelfEvalScorer
    from edge_adapt.tasks.base import Problem, Suite


class LocalBackend:
    def __init__(self, engine: Engine, scorer: SelfEvalScorer, adapter_path: Path | None = None,
                 identity: str | None = None) -> None:
        from edge_adapt.eval.pool import model_identity

        self.engine, self.scorer = engine, scorer
        self._identity = identity or model_identity(engine, scorer, adapter_path)

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def model_path(self) -> Path:
        return self.engine.model_path

    @property
    def info(self) -> GGUFInfo:
        return self.engine.info

    def chat_prompt(self, messages: list[Message]) -> str:
        return self.engine.chat_prompt(messages)

    def generate(self, work: Sequence[tuple[Problem, str]], suite: Suite,
                 settings: PoolSettings) -> Iterator[PromptPool]:
        from edge_adapt.eval.pool import generate_prompt_pool

        for problem, key in work:
            yield generate_prompt_pool(self.engine, self.scorer, suite, problem, settings, key)

    def rescore(self, settings: PoolSettings, key: str, other: PromptPool) -> PromptPool:
        from edge_adapt.eval.pool import rescore_prompt_pool

        return rescore_prompt_pool(self.engine, self.scorer, settings, key, other)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
