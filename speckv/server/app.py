"""The HTTP routes: OpenAI's /v1/completions, /v1/chat/completions, /v1/models, vLLM's
/v1/tokenize and /v1/detokenize, and /health and /metrics.

Every error body is OpenAI's: `{"error": {"message", "type", "param", "code"}}`,
for every status (404, 405, 413 and 500 too); 400 names the field at fault.
/openapi.json describes the routes when no API key is set; with a key it is not
served (it would tell an unauthenticated caller what the server runs).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from speckv.engine.outputs import RequestOutput
from speckv.models.tokenizer import Tokenizer
from speckv.server.async_engine import ACCEPTED, AsyncEngine, EngineError, Overloaded, ShuttingDown
from speckv.server.config import ServerConfig
from speckv.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                    DetokenizeRequest, ResponseShape, TokenizeRequest,
                                    _Sampling, error_body)

logger = logging.getLogger(__name__)

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_DRAIN_BYTES = 64 << 20  # most of an oversized body read (and dropped) before the 413


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code),
                            status_code=self.status, headers=self.headers)


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the routes need to know of the engine, read once at start."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int


def build_app(engine: AsyncEngine, model: ServedModel, config: ServerConfig,
              api_key: str | None = None) -> FastAPI:
    """The FastAPI application; the engine loop starts and stops with it. `api_key`
    (the resolved key, see `ServerConfig.resolved_api_key`) guards every /v1 route."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, 0.0)  # uvicorn already waited the grace

    app = FastAPI(title="speckv", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None if api_key else "/openapi.json")
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when requests can be served ("degraded" while the Valkey a shared pool uses
        is unreachable: requests succeed, prefixes are not shared); 503 naming why not
        (draining, a dead engine loop, an unreachable KV pool)."""
        if engine.fatal is not None:
            return JSONResponse({"status": "engine failed", "error": engine.fatal},
                                status_code=503)
        if not engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not engine.snapshot.get("pool_available", 1):
            return JSONResponse({"status": "pool unavailable",
                                 "error": engine.snapshot.get("pool_error")}, status_code=503)
        if not engine.snapshot.get("valkey_available", 1):  # serving, without sharing
            return JSONResponse({"status": "degraded",
                                 "error": f"Valkey: {engine.snapshot.get('valkey_error')}"})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(_v1_router(engine, model, config, api_key))
    return app


def _v1_router(engine: AsyncEngine, model: ServedModel, config: ServerConfig,
               api_key: str | None) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_bearer(api_key))])
    created = int(time.time())

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": model.name, "object": "model", "created": created, "owned_by": "speckv",
             "max_model_len": model.max_model_len}]}

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        token_ids = model.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return await _serve(engine, model, config, body, token_ids, "prompt", request, chat=False)

    @router.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [m.as_dict() for m in body.messages]
        try:
            text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        token_ids = model.tokenizer.encode(text)
        return await _serve(engine, model, config, body, token_ids, "messages", request, chat=True)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        """vLLM's /tokenize: the ids the engine would see for a prompt or for messages."""
        _check_model(body.model, model)
        text = body.prompt
        if body.messages is not None:
            messages = [m.as_dict() for m in body.messages]
            try:
                text = model.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=body.add_generation_prompt)
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from exc
        tokens = model.tokenizer.encode(text)
        return {"count": len(tokens), "max_model_len": model.max_model_len, "tokens": tokens}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        """vLLM's /detokenize: token ids back to text (special tokens kept)."""
        _check_model(body.model, model)
        vocab = model.tokenizer.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})",
                           param="tokens")
        return {"prompt": model.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return router


def _check_model(name: str | None, model: ServedModel) -> None:
    if name is not None and name != model.name:
        raise APIError(400, f"model {name!r} is not served here; this server serves "
                       f"{model.name!r}", param="model", code="model_not_found")


def _bearer(api_key: str | None):
    expected = None if api_key is None else api_key.encode()

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compared as bytes: the header arrives as latin-1 text, and compare_digest
        # refuses non-ASCII str
        token_bytes = token.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_bytes, expected):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")

    return check


async def _serve(engine: AsyncEngine, model: ServedModel, config: ServerConfig, body: _Sampling,
                 token_ids: list[int], prompt_field: str, request: Request, chat: bool) -> Response:
    _check_model(body.model, model)
    max_tokens = _max_tokens(body, len(token_ids), prompt_field, model.max_model_len, config)
    try:
        params = body.sampling_params(max_tokens)
    except ValueError as exc:
        raise APIError(400, str(exc), param=_param_of(str(exc))) from exc
    try:
        rid, outputs = engine.submit(token_ids, params, prefix="chatcmpl" if chat else "cmpl")
    except Overloaded as exc:
        raise APIError(429, str(exc), code="queue_full", kind="rate_limit_error",
                       headers={"Retry-After": str(exc.retry_after)}) from exc
    except ShuttingDown as exc:
        raise APIError(503, str(exc), kind="server_error", headers={"Retry-After": "5"}) from exc
    first = await _next(engine, rid, outputs, request)  # ACCEPTED, or why not
    if isinstance(first, EngineError):
        raise _engine_error(first, body)
    shape = ResponseShape(chat, model.name, model.tokenizer, body)
    if body.stream:
        return StreamingResponse(_sse(engine, rid, outputs, shape, body.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    while True:
        item = await _next(engine, rid, outputs, request)
        if isinstance(item, EngineError):
            raise _engine_error(item)
        if item.finished:
            return JSONResponse(shape.full(item))


def _max_tokens(body: _Sampling, prompt_tokens: int, prompt_field: str, context: int,
                config: ServerConfig) -> int:
    if prompt_tokens >= context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens; the context window is "
                       f"{context} tokens and needs room for one generated token",
                       param=prompt_field, code="context_length_exceeded")
    asked = body.requested_max_tokens() if isinstance(body, ChatCompletionRequest) else body.max_tokens
    if asked is None:
        return min(config.default_max_tokens, context - prompt_tokens)
    if prompt_tokens + asked > context:
        raise APIError(400, f"max_tokens={asked} plus the prompt's {prompt_tokens} tokens is "
                       f"more than the context window of {context} tokens",
                       param="max_tokens", code="context_length_exceeded")
    return asked


def _param_of(message: str) -> str | None:
    for name in ("guided_json", "guided_regex", "token_budget", "selector", "min_tokens",
                 "max_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "stop", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "best_of",
                 "prompt_logprobs", "logprobs", "prompt"):
        if name in message:
            return name
    return None


def _engine_error(error: EngineError, body: _Sampling | None = None) -> APIError:
    if error.bad_request:
        param = _param_of(error.message)
        if param == "guided_json" and getattr(body, "response_format", None):
            param = "response_format"  # the schema came from there
        return APIError(400, error.message, param=param)
    return APIError(500, error.message, kind="server_error")


async def _next(engine: AsyncEngine, rid: str, outputs: asyncio.Queue,
                request: Request) -> RequestOutput | EngineError | object:
    """The request's next output; aborts it if the client goes away while waiting."""
    while True:
        try:
            item = await asyncio.wait_for(outputs.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                engine.abort(rid)
                raise APIError(499, "client disconnected") from None
            continue
        return item


async def _sse(engine: AsyncEngine, rid: str, outputs: asyncio.Queue, shape: ResponseShape,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one request; a client that goes away aborts it."""
    finished = False
    try:
        started: set[int] = set()  # choices whose first chunk went out
        ended: set[int] = set()  # choices whose finish_reason went out
        while not finished:
            item = await outputs.get()
            if isinstance(item, EngineError):
                finished = True
                yield _event(error_body(item.message, "server_error"))
                break
            finished = item.finished
            for choice in item.outputs:
                reason = choice.finish_reason if choice.index not in ended else None
                first = choice.index not in started
                if choice.delta or reason is not None or (first and shape.chat) or \
                        (first and shape.echo):
                    yield _event(shape.chunk(item, choice, reason, first=first))
                    started.add(choice.index)
                if reason is not None:
                    ended.add(choice.index)
            if finished and include_usage:
                yield _event(shape.usage_chunk(item))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.abort(rid)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kinds = {401: "authentication_error", 404: "not_found_error"}
    message = {404: f"no route {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))
    return JSONResponse(error_body(message, kinds.get(exc.status_code, "invalid_request_error")),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s %s failed", request.method, request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                        status_code=500)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    if error.get("type") == "json_invalid":
        return JSONResponse(error_body(f"malformed JSON body: {error.get('msg')}"),
                            status_code=400)
    if error.get("type") == "model_attributes_type" or error.get("loc") == ("body",):
        return JSONResponse(error_body("the body must be a JSON object"), status_code=400)
    loc = [p for p in error.get("loc", ())[1:]
           if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or "-" in p))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = error.get("msg", "invalid value")
    if error.get("type") == "missing":
        message = "field required"
    elif error.get("type") == "extra_forbidden":
        message = "not supported by this server (unknown field)"
    return JSONResponse(error_body(f"{param}: {message}" if param else message, param=param),
                        status_code=400)


class BodyLimit:
    """Answers 413 to a request body above `max_bytes`, by Content-Length or, for a
    chunked body, as it arrives: the body is read here (at most `max_bytes`) before
    the route sees it, so an oversized upload is refused whole, however it is sent."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(receive, send, more=True)
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            more = message.get("more_body", False)
            if seen > self.max_bytes:
                return await self._reject(receive, send, more)
            if not more:
                break
        body, replayed = b"".join(parts), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: disconnect notices, as the route expects

        await self.app(scope, replay, send)

    async def _reject(self, receive, send, more: bool) -> None:
        """413, after reading (and dropping) what the client still sends, up to
        `_DRAIN_BYTES`: a client that is still uploading then reads the answer instead
        of finding the connection reset under it."""
        drained = 0
        while more and drained < _DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        response = APIError(413, f"request body is larger than {self.max_bytes} bytes",
                            code="body_too_large", headers={"Connection": "close"}).response()
        await response({"type": "http"}, None, send)
