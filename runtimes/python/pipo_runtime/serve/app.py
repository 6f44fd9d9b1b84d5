"""The FastAPI app: OpenAI's routes over one engine, /health, /metrics, OpenAI-shaped errors.

    app = create_app(ServeConfig(out="export/"))     # uvicorn.run(app) or a Ray Serve ingress

Every error body is {"error": {"message", "type", "param", "code"}}; a user's input gets a 4xx,
never a 5xx. A client that goes away cancels its engine requests (their rows are freed at the
engine's next tick).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipo_graphs.errors import PipoUserError

from pipo_runtime.serve.config import ServeConfig
from pipo_runtime.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest,
    generation_config, requested_max_tokens, validation_error)
from pipo_runtime.serve.runs import Run
from pipo_runtime.serve.state import ServerState

log = logging.getLogger("pipo_runtime.serve")
HTTP_ERROR_CODES = {404: ("not_found", "invalid_request_error"),
                    405: ("method_not_allowed", "invalid_request_error")}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class ApiKeyMiddleware:
    """401 on /v1 routes without 'Authorization: Bearer KEY' (pure ASGI: streams and
    disconnects pass through untouched)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.expected and scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(ApiError(
                    401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key", type="authentication_error"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(config: ServeConfig, load_in_background: bool = True,
               on_fatal=None) -> FastAPI:
    """The app over the export `config.out`, loaded at startup: in a thread when
    `load_in_background` (/health answers 503 until it is done), else before startup ends
    (a Ray replica is ready only once loaded). on_fatal(message): called if loading fails."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(config, on_fatal)
        app.state.pipo = state
        if load_in_background:
            threading.Thread(target=state.load, name="pipo-load", daemon=True).start()
        else:
            await asyncio.to_thread(state.load)
        yield
        state.begin_drain()
        await asyncio.to_thread(state.loaded.wait)
        await asyncio.to_thread(state.close)

    app = FastAPI(title="pipo-export serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    _errors(app)
    _routes(app, config)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(PipoUserError)
    async def user_error(request, exc: PipoUserError):
        return error_response(ApiError(400, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        code, kind = HTTP_ERROR_CODES.get(exc.status_code, (None, "invalid_request_error"))
        message = f"no route {request.method} {request.url.path}" \
            if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(ApiError(exc.status_code, message, code=code, type=kind))

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(ApiError(500, f"internal server error ({type(exc).__name__}); "
                                            "this is a bug in the server", code="internal",
                                       type="server_error"))


def _routes(app: FastAPI, config: ServeConfig) -> None:
    def state(request: Request) -> ServerState:
        return request.app.state.pipo

    @app.get("/health")
    async def health(request: Request):
        s = state(request)
        try:
            s.ready()
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(state(request).metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        s = state(request)
        s.ready()
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "pipo-export",
            "max_model_len": s.session.facts.max_context}]}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        s = state(request)
        s.ready()
        s.check_model(body.model)
        prompts = s.completion_prompts(body.prompt)
        return await _serve(request, s, body, prompts, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        s = state(request)
        s.ready()
        s.check_model(body.model)
        prompt = s.chat_prompt(body.messages, body.add_generation_prompt,
                               body.chat_template_kwargs)
        return await _serve(request, s, body, [prompt], "chat.completion")


async def _serve(request: Request, s: ServerState, body, prompts, kind: str):
    if body.n < 1:
        raise ApiError(400, f"n must be >= 1, got {body.n}", "n")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", "stream_options")
    config = generation_config(body, s.defaults,
                               s.max_tokens(requested_max_tokens(body), prompts))
    run = Run(s, prompts, config, body.n, s.config.model_name, kind)
    run.submit()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_stream(s, run, include_usage, body.return_token_ids),
                                   sep="\n")
    task = asyncio.ensure_future(run.body(body.return_token_ids))
    gone = asyncio.ensure_future(_disconnected(request))
    s.responding += 1
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        s.responding -= 1
        gone.cancel()
        if not task.done():  # the client went away (or we are being cancelled)
            task.cancel()
            run.cancel()
    if task.cancelled():
        s.metrics.requests.labels("disconnected", "cancelled").inc()
        return Response(status_code=499)
    return JSONResponse(task.result())


async def _stream(s: ServerState, run: Run, include_usage: bool, return_token_ids: bool):
    s.responding += 1  # a drain waits for the stream's last chunk, not only the engine's
    try:
        async for data in run.chunks(include_usage, return_token_ids):
            yield {"data": data}
    finally:
        s.responding -= 1
        run.cancel()  # no-op when every choice finished; frees the rows otherwise
