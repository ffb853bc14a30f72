"""The OpenAI-compatible HTTP app over one Scheduler: FastAPI routes, SSE streaming, OpenAI-shaped errors.

Every request becomes one scheduler Job; the scheduler's thread hands the job's events to this event loop
(`call_soon_threadsafe`), where they are folded into a response or streamed as chunks. A client that goes
away cancels its job: a stream when Starlette stops iterating it, a plain request by polling for the
disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from edge_adapt.engine.events import Done
from edge_adapt.errors import EdgeAdaptError
from edge_adapt.server import metrics as prometheus
from edge_adapt.server.guard import CORS, MAX_BODY, Guard, before_stop
from edge_adapt.server.jobs import ScoringModel, chat_tokens, completion_tokens, plan_job
from edge_adapt.server.openai_errors import (
    APIError, JSONBody, bad_request, from_library, from_pydantic, json_bytes, lone_surrogate, on_api_error,
    on_http_error, on_unexpected, on_validation_error, shutting_down,
)
from edge_adapt.server.responses import Assembler, Shape
from edge_adapt.server.scheduler import QueueFull, Scheduler, Ticket
from edge_adapt.server.schemas import ChatCompletionRequest, CompletionRequest

M = TypeVar("M", bound=BaseModel)
Kind = Literal["chat", "text"]
PING_S = 2.0  # an SSE comment this often while a stream has nothing to send (queue wait, long prefill, strategy)
DISCONNECT_POLL_S = 0.05  # how often a non-streaming request checks that its client is still there
RETRY_AFTER_S = 1
OFF_LOOP_BYTES = 1 << 16  # a request body this big is parsed and validated off the event loop


@dataclass
class ServerState:
    """What the routes share. `scheduler` is None until the model has loaded (the routes answer 503 meanwhile)."""

    model_id: str
    model_created: int = 0
    scheduler: Scheduler | None = None
    scoring: ScoringModel | None = None  # set with the scheduler
    waiting: set[asyncio.Queue[object]] = field(default_factory=set)  # the event queues of requests in flight
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # requests still sending their body end too

    def stop_requests(self) -> None:
        """The server is stopping: every request in flight ends now with a 503 (a stream: an error event)."""
        self.stopping.set()
        for q in self.waiting:
            q.put_nowait(shutting_down())

    def ready(self) -> Scheduler:
        if self.scheduler is None:
            raise APIError(503, "the model is still loading", code="model_loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.scheduler.failure is not None:  # it will not come back: no Retry-After
            raise APIError(503, f"the server's scheduler stopped ({self.scheduler.failure!r}); restart the server",
                           code="scheduler_failed")
        return self.scheduler

    def accepts(self, model: str | None) -> bool:
        """The served model answers to its id (the GGUF file's stem), its file name, and 'default'; a request
        without `model` gets it too."""
        return model is None or model in (self.model_id, f"{self.model_id}.gguf", "default")

    def check_model(self, model: str | None) -> ScoringModel | None:
        """Nothing for the served model; the ScoringModel when the request names the self-eval model."""
        if self.scoring is not None and model == self.scoring.id:
            return self.scoring
        if not self.accepts(model):
            raise APIError(404, f"The model `{model}` does not exist: this server serves `{self.model_id}`",
                           param="model", code="model_not_found")
        return None

    def model_card(self) -> dict[str, Any]:
        """The served model; once loaded, with an `edge_adapt` block holding its fingerprint (an extra field, as
        llama-server adds its own): a client checks it is the model it renders prompts for."""
        card = {"id": self.model_id, "object": "model", "created": self.model_created, "owned_by": "edge-adapt"}
        if self.scheduler is not None:
            card["edge_adapt"] = {"fingerprint": self.scheduler.engine.fingerprint}
        return card

    def model_cards(self) -> list[dict[str, Any]]:
        """The served model, and its self-evaluation as a model of its own (listed as vLLM lists a LoRA: with
        `parent`), whose `edge_adapt` block says how to ask it (edge_adapt.backends.remote reads it)."""
        cards = [self.model_card()]
        if self.scoring is not None:
            cards.append({"id": self.scoring.id, "object": "model", "created": self.model_created,
                          "owned_by": "edge-adapt", "parent": self.model_id,
                          "edge_adapt": {**self.scoring.card(), **cards[0].get("edge_adapt", {})}})
        return cards


def create_app(state: ServerState, *, api_key: str | None = None, cors_origins: Sequence[str] = (),
               max_body: int = MAX_BODY, loopback_only: bool = False) -> FastAPI:
    # No redirects: a client that POSTs to `/v1/chat/completions/` gets a 404 it can read, not a 307 to follow.
    app = FastAPI(title="edge-adapt", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False,
                  default_response_class=JSONBody)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, origins=tuple(cors_origins),  # type: ignore[arg-type]
                       loopback_only=loopback_only, stopping=state.stopping)
    if cors_origins:  # added last: outermost, so a preflight is answered before the key is asked for
        app.add_middleware(CORS, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"])

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what some health checkers send
    async def health() -> dict[str, str]:
        state.ready()
        return {"status": "ok", "model": state.model_id}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": state.model_cards()}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        scoring = state.check_model(model)
        return state.model_cards()[-1] if scoring is not None else state.model_card()

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(prometheus.render(state.ready().metrics()), media_type=prometheus.CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        scheduler = state.ready()
        if state.check_model(req.model) is not None:
            raise bad_request(f"the self-eval model {req.model} answers completions requests (token ids ending in "
                              "its suffix), not chat", "model")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        prompt = await _library(state, chat_tokens, scheduler.engine, messages)
        return await _answer(request, state, scheduler, req, prompt, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        scheduler = state.ready()
        scoring = state.check_model(req.model)
        prompt = await _library(state, completion_tokens, scheduler.engine, req.prompt)
        return await _answer(request, state, scheduler, req, prompt, "text", scoring)

    return app


# -- requests -----------------------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _parse(request: Request, cls: type[M]) -> M:
    """The body as `cls`: UTF-8 JSON holding one object, every fault a 400 naming what is wrong (a compressed
    body: a 415). A big body is parsed on the worker thread: validating 110,000 messages (3.7 MB) took 0.6 s, a
    stall for every stream."""
    # A compressed body would otherwise be read as if it were not, and refused as bad UTF-8 or JSON.
    encoding = request.headers.get("content-encoding", "identity")
    if encoding.strip().lower() not in ("", "identity"):
        raise APIError(415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed",
                       code="unsupported_content_encoding")
    raw = await request.body()
    if len(raw) < OFF_LOOP_BYTES:
        return _parsed(raw, cls)
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER, _parsed, raw, cls)


def _parsed(raw: bytes, cls: type[M]) -> M:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_body") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON ({str(exc)[:200]})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc.errors()) from None
    except UnicodeEncodeError:  # a refusal that quotes a lone surrogate
        raise lone_surrogate(data) from None


# Tokenizing (and parsing a big body) runs off the event loop on this one worker thread, not on Starlette's pool
# of up to 40: every thread that allocates gets its own malloc arena, and a burst of concurrent clients grew the
# server's RSS by ~27 MiB that way (the load test, edge_adapt.bench.serve_load) for no speed gain (tokenizing
# takes microseconds to ms).
_TOKENIZER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-adapt-tokenize")


async def _library(state: ServerState, fn: Callable[..., Any], *args: Any) -> Any:
    """A library call off the event loop (tokenizing a long prompt takes a while); its refusals are 400s. A
    server that stops meanwhile answers 503 at once, without waiting for the call (which runs on to its end)."""
    try:
        result = await before_stop(asyncio.get_running_loop().run_in_executor(_TOKENIZER, fn, *args), state.stopping)
    except EdgeAdaptError as exc:
        raise from_library(exc) from None
    if result is None:
        raise shutting_down()
    return result


async def _answer(request: Request, state: ServerState, scheduler: Scheduler,
                  req: ChatCompletionRequest | CompletionRequest, prompt: list[int], kind: Kind,
                  scoring: ScoringModel | None = None) -> Response:
    plan = plan_job(req, prompt, n_ctx_seq=scheduler.engine.n_ctx_seq, capacity=scheduler.capacity,
                    n_vocab=scheduler.engine.model.n_vocab, scoring=scoring)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    shape = Shape.new(kind, scoring.id if scoring is not None else state.model_id, plan.n,
                      top_logprobs=plan.top_logprobs, strategy=plan.strategy, include_usage=include_usage,
                      token_ids=req.return_tokens_as_token_ids)
    assembler = Assembler(shape, scheduler.engine.model.piece)
    queue: asyncio.Queue[object] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def sink(item: object) -> None:  # called on the scheduler's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is stopping and nobody is listening
            pass

    try:
        ticket = scheduler.submit(plan.job, sink)
    except QueueFull:
        raise APIError(429, "too many requests are waiting; retry shortly", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EdgeAdaptError as exc:
        err = _refusal(exc, kind)
        if err.code == "budget_exceeded":  # plan_job refuses an n over --parallel itself: this is a strategy's
            err.param = "edge_adapt.budget"
        elif err.param is None and plan.job.strategy is not None:  # its preflight (auto: the policy, its rows)
            err.param = f"edge_adapt.{exc.field}" if exc.field else "edge_adapt"
        raise err from None
    if req.stream:
        return StreamingResponse(_stream(assembler, queue, ticket, state.waiting), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    state.waiting.add(queue)
    try:
        return await _wait(request, assembler, queue, ticket, kind)
    finally:
        state.waiting.discard(queue)


def _refusal(exc: BaseException, kind: Kind) -> APIError:
    """A job's failure as an error: the library's refusals are the request's fault (400), the rest the server's."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EdgeAdaptError):
        err = from_library(exc)
        if err.code == "exceed_context_size_error":
            err.param = "messages" if kind == "chat" else "prompt"
        return err
    return APIError(500, f"the job failed: {type(exc).__name__}: {exc}")


async def _wait(request: Request, assembler: Assembler, queue: asyncio.Queue[object], ticket: Ticket,
                kind: Kind) -> Response:
    """A non-streaming answer: every event folded, then one body; the job is cancelled if the client leaves."""
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_POLL_S
    finished = False
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), max(0.0, next_check - loop.time()))
            except asyncio.TimeoutError:
                item = None
            if loop.time() >= next_check:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it: the job is cancelled below
                next_check = loop.time() + DISCONNECT_POLL_S
            if item is None:
                continue
            if isinstance(item, BaseException):
                finished = _last(item)
                raise _refusal(item, kind)
            assembler.add(item)
            if isinstance(item, Done):
                finished = True
                return JSONBody(assembler.body())
    finally:
        if not finished:
            ticket.cancel()


def _last(item: object) -> bool:
    """The scheduler's last item for a job: Done, or the exception that ended it (an APIError is the server's
    own, put there when it stops: the job still runs and must be cancelled)."""
    return isinstance(item, Done) or (isinstance(item, BaseException) and not isinstance(item, APIError))


def _sse(data: object) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


async def _stream(assembler: Assembler, queue: asyncio.Queue[object], ticket: Ticket,
                  waiting: set[asyncio.Queue[object]]) -> AsyncIterator[bytes]:
    """Server-sent events: chunks as the job produces them, `: ping` while it has nothing to say, `[DONE]` at
    the end. Starlette stops iterating when the client disconnects: `finally` then cancels the job."""
    finished = False  # the stream has said all it will
    ended = False  # the job's last item arrived: nothing to cancel
    waiting.add(queue)
    try:
        opening = assembler.opening()
        if opening:
            yield b"".join(_sse(c) for c in opening)
        while not finished:
            try:
                item = await asyncio.wait_for(queue.get(), PING_S)
            except asyncio.TimeoutError:
                yield b": ping\n\n"
                continue
            items = [item]
            while not queue.empty():  # everything already waiting goes out in one write
                items.append(queue.get_nowait())
            out: list[bytes] = []
            for it in items:
                ended = _last(it)
                try:
                    if isinstance(it, BaseException):
                        raise _refusal(it, assembler.shape.kind)
                    out += [_sse(c) for c in assembler.add(it)]
                except APIError as exc:  # the status line has gone out: the error is an event of its own
                    out.append(_sse(exc.body()))
                    finished = True
                    break
                if isinstance(it, Done):
                    out.append(b"data: [DONE]\n\n")
                    finished = True
                    break
            yield b"".join(out)
    finally:
        waiting.discard(queue)
        if not ended:
            ticket.cancel()
