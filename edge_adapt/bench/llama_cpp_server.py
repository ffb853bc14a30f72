"""`python -m llama_cpp.server`, loading weights as the engine does (`llama_like_the_engine`).

On CPUs with AMX, llama.cpp 0.3.36 crashes on batched decodes of weights in its repacked buffer types, and the
engine loads them into plain CPU buffers; this runs llama-cpp-python's own server the same way, so a side-by-side
benchmark compares the same kernels. Arguments are llama_cpp.server's own (`--model`, `--port`, `--n_ctx`, ...).
It needs that server's dependencies: pip install sse-starlette starlette-context pydantic-settings.
"""

from __future__ import annotations


def main() -> None:
    from edge_adapt.engine.handles import llama_like_the_engine

    with llama_like_the_engine():
        from llama_cpp.server.__main__ import main as serve

        serve()


if __name__ == "__main__":
    main()
