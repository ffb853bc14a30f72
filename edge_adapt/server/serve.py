"""`edge-adapt serve`: bind the socket, answer at once (503 on /health while the model loads in a background
thread), then serve until Ctrl-C / SIGTERM and take everything down in order: HTTP, scheduler, engine."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_adapt.backends.http import key_fault
from edge_adapt.engine import EngineOptions
from edge_adapt.engine.gguf_file import GGUFInfo, inspect_gguf
from edge_adapt.errors import UsageError
from edge_adapt.server.app import ServerState, create_app
from edge_adapt.server.guard import MAX_BODY
from edge_adapt.server.openai_errors import bad_request

PREFIX = "edge-adapt serve:"
# What a browser sends as Origin: scheme://host[:port], no path (a trailing "/" too would never match one), or
# "null" (a page with no origin of its own: a file://, a sandboxed frame, some desktop web views).
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+|null")


@dataclass(frozen=True)
class ServeConfig:
    options: EngineOptions  # model, device, threads ...
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 16
    ctx: int | None = None  # None: 2048, or the model's training context where that is shorter
    mem_budget: str | None = None
    api_key: str | None = None
    max_queue: int = 64
    cors_origins: tuple[str, ...] = ()
    max_body: int = MAX_BODY
    self_eval: Any = None  # SelfEvalConfig of the strategies and MODEL:selfeval (--adapter); None: the model's own

    def __post_init__(self) -> None:
        # Guard compares Origin headers with these as strings: one no browser sends would allow nothing, in silence.
        for origin in self.cors_origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise UsageError(f"--cors-origin: an origin must be scheme://host[:port], 'null' or '*', "
                                 f"got {origin!r}")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the port is known before the server runs."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections made before uvicorn runs wait in the backlog
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def _fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which the decode loop's
    per-step logits arrays (n x 49k floats, a different n each step) come from the heap and fragment it: the
    server's RSS crept up through a load test. A fixed threshold keeps them mmap'ed and given back when freed."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: setting it turns the dynamic rise off
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        pass


def check_api_key(key: str | None) -> None:
    """Refuse a key no client could present (a space at either end, which clients strip; a non-ASCII or control
    character, which a header cannot carry): the server would start and then answer every request 401. The rule
    is the project's client's own (edge_adapt.backends.http.key_fault)."""
    fault = key_fault(key) if key is not None else None
    if fault is not None:
        raise UsageError(f"the API key (--api-key or EDGE_ADAPT_API_KEY) {fault}: no client could send it")


def serve(config: ServeConfig) -> None:
    check_api_key(config.api_key)
    _fixed_mmap_threshold()
    from edge_adapt.engine.default_model import default_model_path

    model_path = Path(config.options.model) if config.options.model is not None else default_model_path()
    if not model_path.is_file():
        raise UsageError(f"model {model_path} is not a file")
    info = inspect_gguf(model_path)  # header to last tensor byte, as Engine() reads it
    options = engine_options(config, info)
    check_before_loading(config, options, model_path, info)
    sock = bind(config.host, config.port)
    state = ServerState(model_id=model_path.stem, model_created=int(model_path.stat().st_mtime))
    app = create_app(state, api_key=config.api_key, cors_origins=config.cors_origins, max_body=config.max_body,
                     loopback_only=is_loopback(sock))
    server = _Server(uvicorn.Config(app, http=_HTTP, log_level="warning", access_log=False, lifespan="off", ws="none",
                                    timeout_graceful_shutdown=3), state)
    failure: list[BaseException] = []
    loader = threading.Thread(target=_load, args=(config, options, state, server, failure), name="edge-adapt-load",
                              daemon=True)
    print(f"{PREFIX} listening on {url_of(sock)}", flush=True)
    if not is_loopback(sock) and config.api_key is None:
        print(f"warning: {config.host} is reachable from other machines and no --api-key is set: anyone who can "
              "reach this port can use the model", file=sys.stderr, flush=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        loader.join()  # a load in progress cannot be interrupted; it is short next to a server's life
        if state.scheduler is not None:
            state.scheduler.close()
            state.scheduler.engine.close()
        sock.close()
    if failure:
        raise failure[0]


class _HTTP(H11Protocol):
    """uvicorn's HTTP/1.1, whose answer to bytes that are not an HTTP request is a 400 in OpenAI's error shape
    (uvicorn's own is plain text; everything after the request line already goes through the app)."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(bad_request(msg, code="invalid_http_request").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, which first ends the requests in flight (503, or an error event in a stream) when it
    stops: otherwise it would wait for every open stream to finish."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.stop_requests()
        await super().shutdown(sockets)


def engine_options(config: ServeConfig, info: GGUFInfo) -> EngineOptions:
    """The options of the server's engine: `--parallel` sequences of `--ctx` tokens, each with its own KV."""
    from edge_adapt.sizing import EngineSize, default_ctx, sized_options

    separate_kv = config.options.model_copy(update={"kv_unified": False})
    return sized_options(EngineSize(config.parallel, config.ctx or default_ctx(2048, info)), separate_kv)


def check_before_loading(config: ServeConfig, options: EngineOptions, model_path: Path, info: GGUFInfo) -> None:
    """Refuse, with the error loading would end in, whatever can be known wrong without the weights: the
    model file, `--ctx`, the device, the memory plan and the self-eval adapter. It runs before the port is
    bound and "listening" is printed, which a script waits for as the sign that a server is coming; only what
    needs the weights (llama.cpp's own load, the adapter against this model) can still fail after it."""
    from edge_adapt.engine.device import gpu_layers_for
    from edge_adapt.engine.engine import check_training_context
    from edge_adapt.sizing import check_budget

    check_training_context(options.ctx, info)
    gpu_layers_for(options.device, options.gpu_layers)
    check_budget(options, config.mem_budget, info)
    _check_self_eval(model_path, info, config.self_eval)


@dataclass(frozen=True)
class _ModelFile:
    """What the self-eval config is resolved from (an engine's, or a Vocab's, path and GGUF facts), known
    before the weights are loaded."""

    model_path: Path
    info: GGUFInfo


def _check_self_eval(model_path: Path, info: GGUFInfo, config: Any) -> None:
    """The self-eval adapter (`--adapter`, or the one shipped for the default model) read as SelfEvaluator
    reads it: an adapter GGUF, header to last tensor byte, whose self-eval metadata, merged with the model's,
    makes a valid config."""
    from edge_adapt.selfeval.evaluator import resolve_config

    resolve_config(_ModelFile(model_path, info), config, None)  # type: ignore[arg-type]  # reads only these two


def _load(config: ServeConfig, options: EngineOptions, state: ServerState, server: object,
          failure: list[BaseException]) -> None:
    """Load the engine and start its scheduler; a failure stops the server (serve() raises it)."""
    from edge_adapt.engine import Engine
    from edge_adapt.server.scheduler import Scheduler

    try:
        engine = Engine(options)  # its memory plan was checked against --mem-budget before binding
        try:
            scorer, scoring = _self_evaluation(engine, state.model_id, config.self_eval)
            scheduler = Scheduler(engine, max_queue=config.max_queue, scorer=scorer)
            scheduler.start()
        except BaseException:
            engine.close()
            raise
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which reports it
        failure.append(exc)
        server.should_exit = True  # type: ignore[attr-defined]
        return
    state.scoring = scoring
    state.scheduler = scheduler
    print(f"{PREFIX} {state.model_id} loaded: {config.parallel} sequences of {engine.n_ctx_seq} tokens, "
          f"{engine.threads} threads", flush=True)


def _self_evaluation(engine: Any, model_id: str, config: Any = None) -> tuple[Any, Any]:
    """The self-evaluator the strategies use, offered as the model `<model>:selfeval` (jobs.ScoringModel)."""
    from edge_adapt.eval.pool import file_hash
    from edge_adapt.selfeval import SelfEvaluator
    from edge_adapt.server.jobs import ScoringModel

    scorer = SelfEvaluator(engine, config)
    adapter = scorer.config.adapter
    scoring = ScoringModel(id=f"{model_id}:selfeval", suffix=tuple(scorer.suffix), adapter_tail=len(scorer.adapter_part),
                           yes_token=scorer.yes_token, no_token=scorer.no_token,
                           adapter=Path(adapter).name if adapter is not None else None,
                           adapter_sha256=file_hash(Path(adapter)) if adapter is not None else None)
    return scorer, scoring
