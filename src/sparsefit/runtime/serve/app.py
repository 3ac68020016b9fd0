"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health
and /metrics, over one `Scheduler` (see scheduler.py).

Every error is OpenAI's error object with one log line: a body that fails validation (FastAPI's
422) is a 400 naming the field, an unknown model a 404, a missing or wrong key a 401, a full
queue a 429 with Retry-After. A client that disconnects, streaming or not, frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparsefit.runtime.engine import Engine
from sparsefit.runtime.engine import Request as EngineRequest
from sparsefit.runtime.sampling import Sampling
from sparsefit.runtime.serve.scheduler import Failure, Metrics, QueueFull, Scheduler, Stopping, Ticket
from sparsefit.runtime.serve.schemas import ChatCompletionRequest, CompletionRequest, describe_errors, error_body

log = logging.getLogger("sparsefit.serve")
MAX_BODY_BYTES = 32 << 20
PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.kind, self.param, self.code)
        return JSONResponse(body, self.status, headers=self.headers)


class _Gate:
    """ASGI middleware: the API key (before the body is read), a cap on the body's size, bodies read
    as JSON, and the request counter by path and status."""

    def __init__(self, app: object, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in PATHS else "other"
        status = {}

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = dict(scope.get("headers") or [])
        error = None
        if self.key and scope["path"].startswith("/v1/"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")  # fmt: skip
        length = headers.get(b"content-length", b"0")
        if error is None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            error = APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB; send a shorter prompt")
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            # the API takes JSON alone: read the body as JSON whatever Content-Type says (curl -d sends a form's)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                     + [(b"content-type", b"application/json")]}  # fmt: skip
        try:
            if error is not None:
                log.warning("%d %s %s: %s", error.status, scope["method"], scope["path"], error.message)
                await error.response()(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(path, str(status.get("code", 499))).inc()


def create_app(model: object, engine: Engine, name: str, api_key: str | None = None, max_queue: int = 64,
               shutdown_timeout: float = 5.0, banner: str | None = None) -> FastAPI:  # fmt: skip
    """The app serving `engine` (built on `model`, a `RuntimeModel`) as model id `name`; `banner` is
    logged at start-up. The caller runs `app.state.scheduler.run()` in the thread that loaded the
    model, beside uvicorn (server.py); the app's shutdown stops it."""
    metrics = Metrics()
    scheduler = Scheduler(engine, metrics, max_queue)
    created = int(time.time())
    tokenizer = model.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # the caller runs `scheduler.run()` in the model's thread
        if banner:
            log.info("%s", banner)
        yield
        await asyncio.to_thread(scheduler.stop, max(1.0, shutdown_timeout))

    app = FastAPI(title="sparsefit", summary="OpenAI-compatible server on the sparse CPU runtime", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        log.warning("%d %s %s: %s", err.status, request.method, request.url.path, err.message)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = describe_errors(list(err.errors()))
        return await _api_error(request, APIError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"{err.detail}: the API is POST /v1/completions, POST /v1/chat/completions, GET /v1/models"
        return await _api_error(request, APIError(err.status_code, message, code=None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("500 %s %s", request.method, request.url.path)
        message = f"internal error ({type(err).__name__}: {err}); the server goes on serving"
        return JSONResponse(error_body(message, "server_error"), 500)

    def check_model(requested: str) -> None:
        if requested != name:
            raise APIError(404, f"the model '{requested}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")  # fmt: skip

    def engine_request(body: CompletionRequest | ChatCompletionRequest, ids: list[int], max_tokens: int | None,
                       field: str, default: int | None) -> EngineRequest:  # fmt: skip
        """The engine's request, with the lengths checked against the context."""
        capacity = engine.capacity
        if not ids:
            raise APIError(400, f"{field}: the prompt is empty", param=field)
        if len(ids) >= capacity:
            raise APIError(400, f"{field}: the prompt is {len(ids)} tokens; this server's context is {capacity} "
                           "tokens (prompt plus completion, --max-model-len); shorten the prompt", param=field,
                           code="context_length_exceeded")  # fmt: skip
        room = capacity - len(ids)
        if max_tokens is None:
            max_tokens = room if default is None else min(default, room)
        elif len(ids) + max_tokens > capacity:
            raise APIError(400, f"max_tokens: the prompt's {len(ids)} tokens plus max_tokens {max_tokens} exceed this "
                           f"server's context of {capacity} tokens; ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")  # fmt: skip
        sampling = Sampling(body.temperature, body.top_p, body.top_k, body.seed)
        return EngineRequest(ids, max_tokens, sampling, tuple(body.stop or ()), body.ignore_eos)

    def submit(request: EngineRequest) -> Ticket:
        try:
            return scheduler.submit(request, asyncio.get_running_loop())
        except QueueFull:
            raise APIError(429, f"all {len(engine.rows)} slots are busy and {scheduler.live - len(engine.rows)} "
                           "requests are waiting; retry after a second", kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        except Stopping:
            raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down",
                           headers={"Retry-After": "5"}) from None  # fmt: skip

    async def collect(ticket: Ticket, request: Request) -> tuple[str, str | None] | None:
        """The whole text and finish reason; None when the client left first (the request is cancelled)."""

        async def consume() -> tuple[str, str | None]:
            parts, reason = [], None
            async for item in ticket.events():
                if isinstance(item, Failure):
                    raise APIError(item.status, item.message, kind="server_error" if item.status >= 500 else
                                   "invalid_request_error")  # fmt: skip
                parts.append(item.text)
                reason = item.finish_reason
            return "".join(parts), reason

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        result, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not result.done():
                log.info("499 POST %s: the client left before the end; request cancelled", request.url.path)
                return None
            return result.result()
        finally:
            gone.cancel()
            result.cancel()
            scheduler.cancel(ticket)

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(
        ticket: Ticket, prompt_tokens: int, include_usage: bool, chunk: Callable, path: str
    ) -> AsyncIterator[str]:
        """Server-sent events: `chunk(text, finish_reason)` per event, usage if asked, then [DONE]."""
        try:
            opening = chunk(None, None)
            if opening is not None:
                yield sse(opening)
            async for item in ticket.events():
                if isinstance(item, Failure):
                    yield sse(error_body(item.message, "server_error" if item.status >= 500 else
                                         "invalid_request_error"))  # fmt: skip
                    break
                if item.text or item.finish_reason:
                    yield sse(chunk(item.text, item.finish_reason))
            if include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": usage(prompt_tokens, ticket.tokens)})
            yield "data: [DONE]\n\n"
            log.info("200 POST %s: %d prompt + %d completion tokens, streamed", path, prompt_tokens, ticket.tokens)
        finally:
            scheduler.cancel(ticket)

    def sse_response(generator: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(generator, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    async def reply(
        body: CompletionRequest | ChatCompletionRequest,
        ticket: Ticket,
        prompt_tokens: int,
        chunk: Callable[[str | None, str | None], dict | None],
        whole: Callable[[str, str | None], dict],
        request: Request,
    ) -> Response:
        """The answer of either endpoint: server-sent `chunk`s when streaming, else `whole(text,
        finish_reason)` with usage once the request ends (499 when the client left first)."""
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return sse_response(stream(ticket, prompt_tokens, include, chunk, request.url.path))
        collected = await collect(ticket, request)
        if collected is None:
            return Response(status_code=499)
        log.info("200 POST %s: %d prompt + %d completion tokens", request.url.path, prompt_tokens, ticket.tokens)
        return JSONResponse({**whole(*collected), "usage": usage(prompt_tokens, ticket.tokens)})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if isinstance(body.prompt, str):
            ids = tokenizer(body.prompt).input_ids
        else:
            vocab = model.decoder.shape.vocab
            if any(not 0 <= t < vocab for t in body.prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            ids = list(body.prompt)
        ticket = submit(engine_request(body, ids, body.max_tokens, "prompt", None))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, reason: str | None) -> dict | None:
            if text is None:
                return None
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return {"id": rid, "object": "text_completion", "created": now, "model": name, "choices": [choice]}

        return await reply(body, ticket, len(ids), chunk, chunk, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model '{name}' has no chat template; use /v1/completions with a plain prompt",
                           param="messages")  # fmt: skip
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template's own check (roles, order) is the client's error
            raise APIError(400, f"messages: the model's chat template refused them ({err})", param="messages") from None
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ticket = submit(engine_request(body, ids, body.token_budget, "messages", None))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name}

        def chunk(text: str | None, reason: str | None) -> dict:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        def whole(content: str, reason: str | None) -> dict:
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                      "finish_reason": reason}  # fmt: skip
            return {**head, "object": "chat.completion", "choices": [choice]}

        return await reply(body, ticket, len(ids), chunk, whole, request)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "sparsefit",
                "max_model_len": engine.capacity}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "slots": len(engine.rows), "running": scheduler.running,
                "waiting": scheduler.waiting, "max_model_len": engine.capacity}  # fmt: skip

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
