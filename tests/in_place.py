"""Counting the steps that sample llama.cpp's buffer in place (engine.outputs), where Engine._in_place finds the rows."""

from __future__ import annotations

from typing import Any

from edge_adapt.engine import Engine


class InPlaceSteps:
    """While it is on, `count` is the number of steps of `engine` that sampled in place."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.count = engine, 0
        self._took = engine._in_place
        engine._in_place = self._counted  # type: ignore[method-assign]

    def _counted(self, live: Any) -> Any:
        found = self._took(live)
        self.count += found is not None
        return found

    def stop(self) -> None:
        self.engine._in_place = self._took  # type: ignore[method-assign]
