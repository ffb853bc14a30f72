from __future__ import annotations

from collections.abc import Iterator

import pytest

from edge_adapt.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The embedded default model with room for 9 short sequences."""
    with Engine(parallel=9, ctx=256, device="cpu") as e:
        yield e


@pytest.fixture(autouse=True)
def _no_leaked_sequences(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that uses the shared engine must give back the sequences it took."""
    yield
    if "engine" in request.fixturenames:
        e = request.getfixturevalue("engine")
        assert e.free_sequences == e.options.parallel, "a test leaked engine sequences"
