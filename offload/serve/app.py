"""The OpenAI-compatible HTTP server: routes, errors in OpenAI's shape, the API key, and `serve()`.

    GET  /v1/models               the one model served
    POST /v1/chat/completions     messages through the model's chat template; streamed or not
    POST /v1/completions          a text prompt (or token ids); streamed or not
    GET  /metrics                 Prometheus text: requests, tokens, expert hit rate, bytes moved, queue
    GET  /health                  {"status": "ok", ...}

Every request that cannot be served gets {"error": {"message", "type", "param", "code"}} with its status
(400 a bad field, 401 a wrong API key, 404 an unknown model or route, 413 a body over the limit, 503 the
queue is full, with Retry-After); a bug is a 500 with one line, its traceback going to the server's log."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from quant.errors import UserError

from ..generate import Sampling, positions_needed
from ..runtime import load
from . import schema
from .engine import Busy, Engine, Finished, Job

log = logging.getLogger("moe_offload.serve")

API_KEY_ENV = "MOE_OFFLOAD_API_KEY"
MAX_BODY = 4 << 20  # bytes: a long chat history is tens of KiB of JSON; far more is a mistake or an attack
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 503: "server_busy", 500: "server_error"}


class ApiError(Exception):
    """A request the server answers with `status` and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        body = schema.Error(error=schema.ErrorBody(message=self.message, type=ERROR_TYPES.get(self.status, "error"),
                                                   param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


class Guard:
    """ASGI middleware run before any route: the API key on /v1 routes, then the body size limit (also for
    a chunked body that announces no length: it is read up to the limit, then handed on)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"")
            # Compared in constant time: how long a wrong key took must not say how much of it was right.
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode()):
                what = "no API key given" if not given else "the API key is wrong"
                return await ApiError(401, f"{what}: send 'Authorization: Bearer KEY' with the server's key",
                                      code="invalid_api_key").response()(scope, receive, send)
        too_big = ApiError(413, f"the request body is larger than the server's limit of {self.max_body} bytes "
                                f"(--max-body)", code="request_too_large")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await too_big.response()(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_big.response()(scope, receive, send)
        replayed = False

        async def replay():
            # The body once, as read; then the client's own messages (a disconnect, which streams watch for).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine: Engine, model_id: str, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    """The server's routes over `engine`, which serves the model named `model_id` to clients."""
    app = FastAPI(title="moe-offload", docs_url=None, redoc_url=None, openapi_url=None)
    created = schema.now()
    rt = engine.rt

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return exc.response()

    @app.exception_handler(UserError)
    async def _user_error(_, exc: UserError):
        return ApiError(400, str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: HttpRequest, exc: HTTPException):
        where = f"{request.method} {request.url.path}"
        message = {404: f"no route {where}", 405: f"{where}: method not allowed"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(_, exc: Exception):
        log.exception("request failed")
        return ApiError(500, f"internal error ({type(exc).__name__}); the server's log has the details").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "queue_length": engine.waiting}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    card = schema.ModelCard(id=model_id, created=created)

    @app.get("/v1/models")
    async def models():
        return schema.ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name, model_id)
        return card.model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schema.ChatRequest, request: HttpRequest):
        check_model(body.model, model_id)
        ids = rt.encode_messages([m.for_template() for m in body.messages])
        return await respond(engine, request, body, ids, chat=True, model_id=model_id)

    @app.post("/v1/completions")
    async def completions(body: schema.CompletionRequest, request: HttpRequest):
        check_model(body.model, model_id)
        if isinstance(body.prompt, str):
            ids = rt.encode(body.prompt)
        else:
            vocab = rt.config.vocab_size
            if not all(0 <= i < vocab for i in body.prompt):
                raise ApiError(400, f"prompt: a token id outside the vocabulary (0..{vocab - 1})", param="prompt")
            ids = body.prompt
        return await respond(engine, request, body, ids, chat=False, model_id=model_id)

    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    return app


def check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_id}' (GET /v1/models)",
                       param="model", code="model_not_found")


def validation_error(exc: RequestValidationError) -> ApiError:
    """A pydantic error as one line naming the field, e.g. 'messages: List should have at least 1 item'."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
    if first.get("type") == "missing" and not loc:
        return ApiError(400, "the request body is missing: send a JSON object")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    param = ".".join(loc) or None
    if not param:  # the body as a whole: not an object, or not sent as JSON (curl -d without a Content-Type)
        return ApiError(400, f"the request body: {message} (send a JSON object, Content-Type: application/json)")
    return ApiError(400, f"{param}: {message}", param=param)


async def respond(engine: Engine, request: HttpRequest, body: schema.Request, ids: list[int], chat: bool,
                  model_id: str):
    """Check the request against the context, queue it, and answer: a stream of chunks, or one body."""
    context = engine.rt.model.max_seq
    if len(ids) > context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, more than the context of {context} tokens "
                            f"(the server's --context)", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    limit = body.limit()
    max_tokens = context - len(ids) + 1 if limit is None else limit  # default: as many as the context holds
    if positions_needed(len(ids), max_tokens) > context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) need "
                            f"{positions_needed(len(ids), max_tokens)} positions, more than the context of "
                            f"{context} tokens (the server's --context)",
                       param="max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens",
                       code="context_length_exceeded")
    sampling = Sampling(temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed)
    job = Job(ids, max_tokens, sampling, body.stops)
    try:
        engine.submit(job)
    except Busy as exc:
        raise ApiError(503, str(exc), code="server_busy", headers={"Retry-After": str(exc.retry_after)}) from None
    rid, created = schema.new_id("chatcmpl" if chat else "cmpl"), schema.now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = sse(job, chat, rid, created, model_id, include_usage)
        return JobStream(job, events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # Nothing is sent to a plain request's client until the end, so nothing would fail when it leaves: a task
    # waits for the server's word that it has (the body is read, so the next message is the disconnect).
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    pieces: list[str] = []
    try:
        while True:
            kind, value = await job.next_event()
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise value
            else:
                return whole_response(value, "".join(pieces), chat, rid, created, model_id)
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once it has finished; else the handler itself was cancelled


async def cancel_on_disconnect(request: HttpRequest, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()  # the worker stops within a token; the handler's response goes nowhere


def whole_response(end: Finished, text: str, chat: bool, rid: str, created: int, model_id: str) -> dict:
    if end.finish_reason == "cancelled":  # only when the server stops under a waiting request
        raise ApiError(503, "the server is shutting down", code="server_busy")
    if chat:
        choice = schema.ChatChoice(message=schema.ChatMessage(content=text), finish_reason=end.finish_reason)
    else:
        choice = schema.TextChoice(text=text, finish_reason=end.finish_reason)
    return schema.Response(
        id=rid, object="chat.completion" if chat else "text_completion", created=created, model=model_id,
        choices=[choice], usage=schema.usage(end.prompt_tokens, end.completion_tokens, end.stats.get("prompt_tokens_reused", 0)),
        moe_offload=end.stats).model_dump(exclude_none=True)


async def sse(job: Job, chat: bool, rid: str, created: int, model_id: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: the text as it comes, a last chunk with the finish reason
    and the statistics, the usage chunk if asked for (stream_options.include_usage), then `data: [DONE]`."""
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, **extra) -> str:
        chunk = schema.Response(id=rid, object=kind_name, created=created, model=model_id, choices=choices, **extra)
        return f"data: {json.dumps(chunk.model_dump(exclude_none=True, exclude={'choices': {'__all__': {'logprobs'}}}))}\n\n"

    def choice(text: str | None, finish: str | None = None, role: bool = False):
        if chat:
            return schema.ChatChunkChoice(delta=schema.Delta(role="assistant" if role else None, content=text),
                                          finish_reason=finish)
        return schema.TextChoice(text=text or "", finish_reason=finish)

    try:
        if chat:
            yield event([choice("", role=True)])
        while True:
            kind, value = await job.next_event()
            if kind == "text":
                yield event([choice(value)])
                continue
            if kind == "error":
                log.error("stream ended by an error: %s", value)
                error = schema.ErrorBody(message=f"internal error ({type(value).__name__})", type="server_error")
                yield f"data: {json.dumps({'error': error.model_dump()})}\n\n"
            elif value.finish_reason == "cancelled":
                error = schema.ErrorBody(message="the server is shutting down", type="server_busy")
                yield f"data: {json.dumps({'error': error.model_dump()})}\n\n"
            else:
                yield event([choice(None, value.finish_reason)], moe_offload=value.stats)
                if include_usage:
                    reused = value.stats.get("prompt_tokens_reused", 0)
                    yield event([], usage=schema.usage(value.prompt_tokens, value.completion_tokens, reused))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


class JobStream(StreamingResponse):
    """A stream that cancels its job however it ends: also when the client leaves before the first chunk,
    when the event generator above never started and so never reaches its own `finally`."""

    def __init__(self, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def model_name(model: str | os.PathLike | None) -> str:
    """The name clients use for the model: 'demo', or the folder's name."""
    if model is None or str(model) == "demo":
        return "demo"
    return Path(model).expanduser().resolve().name


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port now, so that a port in use is one line before the model loads, and port 0
    gets a free port whose number the ready line can say."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except (OSError, OverflowError) as exc:
        raise UserError(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc}); "
                        f"choose another --host or --port") from None


def serve(model: str | os.PathLike | None = "demo", host: str = "127.0.0.1", port: int = 8000, *,
          max_queue: int = 16, api_key: str | None = None, max_body: int = MAX_BODY, threads: int | None = None,
          name: str | None = None, ready: Callable[[str], None] | None = None, progress=None,
          **load_options) -> None:
    """Load `model` and serve it over HTTP until interrupted (Ctrl-C or SIGTERM). `api_key` (default: the
    MOE_OFFLOAD_API_KEY environment variable) is required as a Bearer token on /v1 routes; `ready(url)` is
    called once the server listens. Other options go to `offload.load`."""
    import uvicorn

    if max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {max_queue}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    sock = listen(host, port)
    try:
        rt = load(model, progress=progress, threads=threads, **load_options)
        # The engine's worker thread computes: OpenMP's count set here by `load` does not carry over to it.
        engine = Engine(rt, max_queue=max_queue, threads=rt.stats()["threads"])
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(engine, name or model_name(model), api_key, max_body)
        # A running stream holds its connection: after 5 s of Ctrl-C it is cut rather than waited for.
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        bound = sock.getsockname()
        where = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
        if not api_key and not ipaddress.ip_address(bound[0]).is_loopback:
            log.warning("moe-offload: listening on %s without an API key: anyone who can reach this address can "
                        "use the model (--api-key or $%s)", where, API_KEY_ENV)
        if ready:
            # Said once uvicorn has started, inside its signal handlers: a Ctrl-C right after the line is
            # then the server's graceful shutdown, not an interrupt of its start-up.
            startup = server.startup

            async def started(sockets=None):
                await startup(sockets=sockets)
                if server.started:
                    ready(f"http://{where}:{bound[1]}/v1")

            server.startup = started
        # uvicorn re-raises a Ctrl-C it shut down on once it is done, but from inside asyncio.run, whose own
        # SIGINT handler then only cancels a task that may already have finished: the process could exit 0.
        # The interrupt is kept here and raised after the run, so Ctrl-C always exits as an interrupt (130).
        signals = []
        handle_exit = server.handle_exit

        def on_signal(sig, frame):
            signals.append(sig)
            handle_exit(sig, frame)

        server.handle_exit = on_signal
        server.run(sockets=[sock])
        if signal.SIGINT in signals:
            raise KeyboardInterrupt
    finally:
        engine.close()
        sock.close()
