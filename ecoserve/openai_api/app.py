"""The FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (JSON or SSE
streams), plus /health, /version and Prometheus /metrics, all answered through one
`AsyncClient` to the coordinator. On the metrics port (`serve --metrics-port`) only /metrics
answers.

Stop strings (`stop`) are applied here, on the text as it streams in: the output ends before the
first one, nothing past it is sent, and the request is aborted on the coordinator at once so its
KV is freed (the coordinator counts it as aborted; the reply says finish_reason "stop", and
usage counts the tokens generated until the stop string was seen).

Errors take OpenAI's shape and status: 400 for a bad field (ours, or the coordinator's
bad_request reply), 401 for a missing or wrong API key, 404 for an unknown model or path, 413
for a body over the limit, 503 while the cluster cannot serve. A client that disconnects
mid-stream ends the SSE response, which aborts its request on the coordinator.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import ecoserve
from ecoserve.client import AsyncClient, Completion, Delta, RequestError
from ecoserve.openai_api import requests as api
from ecoserve.openai_api.metrics import FrontDoorMetrics, RequestTimes
from ecoserve.openai_api.requests import ApiError
from ecoserve.openai_api.stop import StopScan

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}  # metric labels
# The coordinator's error codes as HTTP statuses; anything else is a 500.
STATUS = {"bad_request": 400, "over_limit": 429, "shutting_down": 503, "server_unreachable": 503, "failed": 500}


@dataclass(frozen=True)
class Settings:
    """What the HTTP process serves: the coordinator's client address, the model's folder (its
    tokenizer's chat template), an optional API key, the largest body accepted, and the number
    of worker ranks the cluster has (/health is 503 while fewer are alive; 0: those registered),
    and the port that serves /metrics alone (None: none does)."""

    address: str
    model_folder: str | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    num_ranks: int = 0
    metrics_port: int | None = None


def create_app(settings: Settings, on_ready: Callable[[], object] | None = None) -> FastAPI:
    state: dict[str, Any] = {}
    metrics = FrontDoorMetrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["client"] = await AsyncClient.connect(settings.address, timeout=30, client_name="ecoserve-http")
        state["template"] = _chat_template(settings.model_folder)
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await state["client"].close()

    app = FastAPI(title="EcoServe", version=ecoserve.__version__, lifespan=lifespan)

    def client() -> AsyncClient:
        return state["client"]  # type: ignore[no-any-return]

    def model_id() -> str:
        info = client().server_info
        return info.model_id if info is not None else ""

    @app.middleware("http")
    async def _metrics_port_serves_metrics_only(request: Request, call_next: Any) -> Any:
        server = request.scope.get("server")
        on_metrics_port = settings.metrics_port is not None and server is not None and server[1] == settings.metrics_port
        if on_metrics_port and request.url.path != "/metrics":
            error = ApiError(404, "this port serves /metrics only", code="not_found")
            return JSONResponse(error.body(), status_code=404)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint is not None:  # a completion request that never started (or failed before its reply)
            metrics.served(endpoint, "failed" if exc.status == 500 else "refused")
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            stats = await client().stats(timeout=5)
        except (RequestError, ConnectionError, TimeoutError) as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        ranks = settings.num_ranks or sum(1 for key in stats if key.startswith("rank") and key.endswith(".pid"))
        alive = int(stats.get("workers_alive", 0))
        if ranks == 0 or alive < ranks:  # a lost rank's role may be one the cluster cannot serve without
            reason = f"{alive} of {ranks} worker ranks are alive"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok", "workers_alive": alive})

    @app.get("/metrics")
    async def metrics_text() -> Response:
        try:
            stats: dict[str, float] | None = await client().stats(timeout=5)
        except (RequestError, ConnectionError, TimeoutError):
            stats = None  # the families of this process still answer; ecoserve:coordinator_up says 0
        return Response(metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": ecoserve.__version__}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, settings.api_key)
        info = client().server_info
        card = {"id": model_id(), "object": "model", "created": 0, "owned_by": "ecoserve",
                "max_model_len": info.max_model_len if info is not None else 0}  # vLLM's field: clients size prompts by it
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        _authorize(request, settings.api_key)
        req = api.parse(await _read_json(request, settings.max_body_bytes), chat=False)
        return await _serve(req, client(), model_id(), _Shape(chat=False), metrics, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        _authorize(request, settings.api_key)
        req = api.parse(await _read_json(request, settings.max_body_bytes), chat=True)
        template: Callable[[list[dict[str, str]]], list[int]] | None = state["template"]
        if template is None:
            raise api.bad("messages", f"model {model_id()!r} has no chat template; use /v1/completions")
        assert isinstance(req.prompt, list)
        req = api.Request(req.model, template(req.prompt), req.params, req.slo, req.stream, req.include_usage,  # type: ignore[arg-type]
                          req.stop)
        return await _serve(req, client(), model_id(), _Shape(chat=True), metrics, request)

    return app


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        what = "no API key given" if not given else "the API key is wrong"
        raise ApiError(401, f"{what}: send the server's --api-key as 'Authorization: Bearer KEY'",
                       code="invalid_api_key", type_="authentication_error")


async def _read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is over this server's limit of {limit} bytes", code="body_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None


def _chat_template(folder: str | None) -> Callable[[list[dict[str, str]]], list[int]] | None:
    """Messages -> prompt token ids by the model's chat template, as `LLM.encode_prompt(chat=True)`."""
    if folder is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if not tok.chat_template:
        return None

    def apply(messages: list[dict[str, str]]) -> list[int]:
        ids: Any = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5: a BatchEncoding

    return apply


def _request_error(exc: RequestError) -> ApiError:
    status = STATUS.get(exc.code, 500)
    kind = "invalid_request_error" if status == 400 else "server_error"
    param = _param_of(exc.message) if status == 400 else None
    return ApiError(status, exc.message, param=param, code=exc.code, type_=kind)


def _param_of(message: str) -> str | None:
    """The request field a coordinator's bad_request message is about, when it names one."""
    for field in ("max_tokens", "prompt", "stop_token_ids", "top_k", "top_p", "temperature", "seed"):
        if field in message:
            return field
    return None


@dataclass(frozen=True)
class _Shape:
    """How one endpoint's responses look (completions or chat)."""

    chat: bool

    @property
    def prefix(self) -> str:
        return "chatcmpl-" if self.chat else "cmpl-"

    @property
    def endpoint(self) -> str:
        return "chat_completions" if self.chat else "completions"

    def object(self, stream: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if stream else "chat.completion"
        return "text_completion"

    def choice(self, text: str | None, finish: str | None, stream: bool, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if stream:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


def _usage(done: Completion, num_tokens: int | None = None) -> dict[str, int]:
    n = len(done.token_ids) if num_tokens is None else num_tokens
    return {"prompt_tokens": done.num_prompt_tokens, "completion_tokens": n, "total_tokens": done.num_prompt_tokens + n}


def _finish(done: Completion) -> str:
    return done.finish_reason if done.finish_reason in ("stop", "length") else "abort"


class _Tally:
    """One request as this process sees it: its stop strings' scan, when its tokens came, how
    many, and whether a stop string ended it."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.scan = StopScan(stops) if stops else None
        self.times = RequestTimes()
        self.num_tokens = 0

    @property
    def stopped(self) -> bool:
        return self.scan is not None and self.scan.matched

    def finish(self, done: Completion) -> str:
        return "stop" if self.stopped else _finish(done)

    def billed(self, done: Completion) -> int:
        return self.num_tokens if self.stopped else len(done.token_ids)

    def outcome(self, done: Completion) -> str:
        return "finished" if self.finish(done) != "abort" else "aborted"


async def _texts(client: AsyncClient, stream: Any, deltas: AsyncIterator[Delta], first: Delta | None,
                 tally: _Tally) -> AsyncIterator[str]:
    """The text pieces to send, one per delta; a matched stop string aborts the request, whose
    stream then ends with its Completion (raises RequestError as the stream does)."""
    loop = asyncio.get_running_loop()
    delta = first
    while delta is not None:
        tally.times.add(loop.time(), len(delta.token_ids))
        tally.num_tokens += len(delta.token_ids)
        if tally.scan is None:
            yield delta.text
        else:
            piece = tally.scan.feed(delta.text)
            if tally.scan.matched:
                if piece:
                    yield piece
                await client.abort(stream.request_id)  # frees its KV now; what it made since is dropped
                async for _ in deltas:
                    pass
                return
            yield piece
        delta = await anext(deltas, None)
    if tally.scan is not None and (rest := tally.scan.flush()):
        yield rest


class _ClientGone(Exception):
    """The HTTP client disconnected while the reply was still being prepared."""


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the request's body is read: the next ASGI message is
    the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request | None, work: Any) -> Any:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled (which
    aborts its request on the coordinator, freeing its KV) and `_ClientGone` raised. Covers the
    waits before a reply starts (a whole non-streamed completion, a stream's first token), where
    the streaming response's own disconnect watch does not run yet."""
    if request is None:
        return await work
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise _ClientGone


async def _serve(req: api.Request, client: AsyncClient, model: str, shape: _Shape,
                 metrics: FrontDoorMetrics | None = None, http: Request | None = None) -> Response:
    try:
        return await _reply(req, client, model, shape, metrics, http)
    except _ClientGone:
        if metrics is not None:
            metrics.served(shape.endpoint, "aborted")
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"


async def _reply(req: api.Request, client: AsyncClient, model: str, shape: _Shape,
                 metrics: FrontDoorMetrics | None, http: Request | None) -> JSONResponse | StreamingResponse:
    if req.model != model:
        raise ApiError(404, f"the model {req.model!r} does not exist here; this server serves {model!r}",
                       param="model", code="model_not_found")
    prompt: str | list[int] = req.prompt  # type: ignore[assignment]
    head = {"id": shape.prefix + uuid.uuid4().hex, "object": shape.object(req.stream), "created": int(time.time()), "model": model}
    tally = _Tally(req.stop)
    if not req.stream and not req.stop:
        try:
            done = await _unless_gone(http, client.generate(prompt, req.params, slo=req.slo))
        except RequestError as exc:
            raise _request_error(exc) from None
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        if metrics is not None:
            metrics.served(shape.endpoint, tally.outcome(done), done)
        choice = shape.choice(done.text, _finish(done), stream=False)
        return JSONResponse({**head, "choices": [choice], "usage": _usage(done)})
    try:
        stream = client.stream(prompt, req.params, slo=req.slo)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from None
    deltas = aiter(stream)
    try:  # the first event before the 200: a refused request gets its own status, not a broken stream
        first: Delta | None = await _unless_gone(http, anext(deltas))
    except StopAsyncIteration:
        first = None
    except RequestError as exc:
        raise _request_error(exc) from None
    except _ClientGone:
        await stream.aclose()
        raise
    if req.stream:
        events = _events(client, stream, deltas, first, head, shape, req.include_usage, tally, metrics)
        return StreamingResponse(events, media_type="text/event-stream")
    try:  # not streamed, with stop strings: read the stream here
        text = "".join([piece async for piece in _texts(client, stream, deltas, first, tally)])
    except RequestError as exc:
        raise _request_error(exc) from None
    finally:
        await stream.aclose()
    ended = stream.completion
    assert ended is not None
    if metrics is not None:
        metrics.served(shape.endpoint, tally.outcome(ended), ended, tally.times, tally.billed(ended))
    choice = shape.choice(text, tally.finish(ended), stream=False)
    return JSONResponse({**head, "choices": [choice], "usage": _usage(ended, tally.billed(ended))})


async def _events(client: AsyncClient, stream: Any, deltas: AsyncIterator[Delta], first: Delta | None,
                  head: dict[str, Any], shape: _Shape, include_usage: bool, tally: _Tally,
                  metrics: FrontDoorMetrics | None) -> AsyncIterator[str]:
    """The SSE events of one stream; leaving early (the client went away) aborts the request."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    outcome = "aborted"  # unless it gets to its end: the client went away
    done: Completion | None = None
    try:
        if shape.chat:
            yield event([shape.choice("", None, stream=True, first=True)])
        try:
            async for piece in _texts(client, stream, deltas, first, tally):
                yield event([shape.choice(piece, None, stream=True)])
        except RequestError as exc:
            outcome = "failed"
            yield f"data: {json.dumps(_request_error(exc).body())}\n\n"
            return
        done = stream.completion
        assert done is not None
        outcome = tally.outcome(done)
        yield event([shape.choice(None if shape.chat else "", tally.finish(done), stream=True)])
        if include_usage:
            yield event([], usage=_usage(done, tally.billed(done)))
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()
        if metrics is not None:
            metrics.served(shape.endpoint, outcome, done, tally.times, tally.billed(done) if done else None)
