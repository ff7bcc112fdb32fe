"""The HTTP API's Starlette app: routes, the security rules, and streaming jobs to clients.

Requests take the path a gRPC call takes: the one validation (via openai.parse_request), then
`worker.submit_generation`, then the job's events. The job hands each event straight to the event
loop (no thread in between); a client that goes away cancels the job
(`Job.cancel`, what a gRPC cancel calls), so its worker slot frees at once.

Security, for a server that any web page in the user's browser can reach:
- Host must be a loopback name (or one configured): DNS rebinding points a foreign name at
  127.0.0.1, and the browser then sends that name.
- A cross-origin request (an Origin that is not this server's) is refused unless the origin is
  in the CORS allow-list; CORS headers go only to those origins, never `*`.
- POST bodies must be application/json (no form post can make one without a CORS preflight)
  and at most `server.http_max_body_bytes`.
- An API key (`Authorization: Bearer`), when one is set; the server sets one off loopback.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Literal

import anyio
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from speclora.daemon.errors import InvalidRequestError, ShuttingDownError, UnauthenticatedError
from speclora.daemon.http import dashboard, openai
from speclora.daemon.http.metrics import render_metrics
from speclora.daemon.stats import StatsSnapshot
from speclora.daemon.worker import JOB_END, GenerateJob, GenerationResult, Worker
from speclora.shared.config import Config
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

log = structlog.get_logger(__name__)

State = Literal["loading", "serving", "stopping"]
_LOOPBACK_NAMES = ("localhost", "localhost.")
_OPEN_PATHS = ("/health",)  # no key needed: supervisors and load balancers probe it
# The web page's static files need no key either (they hold no data; what the page shows comes
# from /api/*, which does): the page asks for the key when the API answers 401.
_PAGE_PATHS = ("/", *(f"/page/{name}" for name in dashboard.ASSETS))
# Bodies up to this size are validated and tokenized on the event loop (well under a ms);
# larger ones in a thread, so that a long prompt never stalls other streams.
_INLINE_BODY_BYTES = 16 * 1024


def endpoint(
    name: str,
) -> Callable[[Callable[..., Awaitable[Response]]], Callable[[Any, Request], Awaitable[Response]]]:
    """Bind the request's log context and turn every error into an OpenAI error body, in one
    place (the HTTP side of what the servicer's `_rpc` does)."""

    def wrap(
        fn: Callable[..., Awaitable[Response]],
    ) -> Callable[[Any, Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Request) -> Response:
            request_id = uuid.uuid4().hex[:16]
            with structlog.contextvars.bound_contextvars(http=name, request_id=request_id):
                try:
                    return await fn(self, request, request_id)
                except Exception as exc:
                    return error_json(exc, request_id)

        return handler

    return wrap


class HttpApi:
    """The app plus what it serves from. It exists before the models load (every route but
    /health answers 503 until `attach`), and `begin_shutdown` turns it back to 503."""

    def __init__(
        self,
        config: Config,
        *,
        api_key: str | None = None,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.config = config
        self.state: State = "loading"
        self.worker: Worker | None = None
        self.snapshot: Callable[[], StatsSnapshot] | None = None
        self.started = int(time.time())
        s = config.server
        self._keepalive_s = s.http_keepalive_s
        self._max_body = s.http_max_body_bytes
        routes = [
            Route("/", self.page, methods=["GET"]),
            Route("/page/{name}", self.page_asset, methods=["GET"]),
            Route("/api/stats", self.api_stats, methods=["GET"]),
            Route("/api/timeline", self.api_timeline, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        middleware = [
            Middleware(
                Guard,
                allowed_hosts=allowed_hosts,
                allowed_origins=s.http_cors_origins,
                api_key=api_key,
            ),
            Middleware(
                CORSMiddleware,
                allow_origins=list(s.http_cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type"],
            ),
        ]
        self.app = Starlette(
            routes=routes,
            middleware=middleware,
            exception_handlers={HTTPException: _http_exception},
        )

    def attach(self, worker: Worker, snapshot: Callable[[], StatsSnapshot]) -> None:
        """Serve from this worker; `snapshot` is the one Stats assembles."""
        self.worker, self.snapshot = worker, snapshot

    def start_serving(self) -> None:
        if self.worker is None:
            raise RuntimeError("attach a worker before serving")
        self.state = "serving"

    def begin_shutdown(self) -> None:
        self.state = "stopping"

    # ------------------------------------------------------------------ routes

    async def health(self, request: Request) -> Response:
        if self.state == "serving":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": self.state}, status_code=503)

    async def page(self, request: Request) -> Response:
        """The web page (served while loading too: it says so, from /api/stats's 503)."""
        return self._asset("index.html")

    async def page_asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in dashboard.ASSETS or name == "index.html":
            raise HTTPException(404, "no such file")
        return self._asset(name)

    def _asset(self, name: str) -> Response:
        return Response(
            dashboard.asset(name),
            media_type=dashboard.ASSETS[name],
            headers=dashboard.PAGE_HEADERS,
        )

    @endpoint("api_stats")
    async def api_stats(self, request: Request, request_id: str) -> Response:
        """The Stats RPC's snapshot as JSON, plus `daemon` (device, auto-train state)."""
        worker, snapshot = self._require_serving()
        snap = await anyio.to_thread.run_sync(snapshot)
        body = dashboard.stats_json(snap)
        body["daemon"] = dashboard.extras_json(self.config, snap, worker.idle_seconds)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @endpoint("api_timeline")
    async def api_timeline(self, request: Request, request_id: str) -> Response:
        """Per-request points (after `since`) and training runs, for the learning chart."""
        worker = self._require_serving()[0]
        raw = request.query_params.get("since", "0")
        if not raw.isdigit() or len(raw) > 18:
            raise InvalidRequestError("since", f"must be a whole number >= 0, got {raw[:40]!r}")
        # Up to server.timeline_requests points to encode: off the event loop, so streams
        # being served meanwhile do not stall.
        timeline, since = worker.stats.timeline, int(raw)
        body = await anyio.to_thread.run_sync(lambda: dashboard.timeline_json(timeline, since))
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @endpoint("metrics")
    async def metrics(self, request: Request, request_id: str) -> Response:
        snapshot = self._require_serving()[1]
        text = await anyio.to_thread.run_sync(lambda: render_metrics(snapshot()))
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @endpoint("models")
    async def models(self, request: Request, request_id: str) -> Response:
        worker = self._require_serving()[0]
        obj = openai.model_object(worker.hub, self.config, self.started)
        return JSONResponse(openai.models_list([obj]))

    @endpoint("model")
    async def model(self, request: Request, request_id: str) -> Response:
        worker = self._require_serving()[0]
        name = request.path_params["model"]
        if name not in openai.model_aliases(worker.hub, self.config):
            raise openai.ModelNotServed(f"model {name[:100]!r} is not served here")
        return JSONResponse(openai.model_object(worker.hub, self.config, self.started))

    @endpoint("chat_completions")
    async def chat_completions(self, request: Request, request_id: str) -> Response:
        return await self._generate(request, request_id, "chat")

    @endpoint("completions")
    async def completions(self, request: Request, request_id: str) -> Response:
        return await self._generate(request, request_id, "completion")

    # ------------------------------------------------------------------ generation

    async def _generate(self, request: Request, request_id: str, kind: openai.Kind) -> Response:
        worker = self._require_serving()[0]
        body, size = await read_json(request, self._max_body)

        def submit() -> tuple[openai.ApiRequest, GenerateJob]:
            api = openai.parse_request(kind, body, self.config, worker.hub, request_id)
            return api, worker.submit_generation(api.generation, api.prompt_tokens)

        # A thread hop costs a GIL handover, up to the 5 ms switch interval while the worker
        # computes: small requests skip it.
        api, job = (
            submit() if size <= _INLINE_BODY_BYTES else await anyio.to_thread.run_sync(submit)
        )
        log.info(
            "generation_queued",
            prompt_tokens=len(api.prompt_tokens),
            max_tokens=api.generation.max_tokens,
            mode=api.generation.mode,
            stream=api.stream,
            queue_depth=worker.queue_depth,
        )
        tokenizer = getattr(worker.hub, "tokenizer", None)
        answer = openai.Answer(api, decode=getattr(tokenizer, "decode", None))
        events = JobEvents(job)
        if api.stream:
            return SSEResponse(
                self._stream(answer, events, request_id),
                on_close=job.cancel,
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return await self._whole(answer, events, request)
        finally:
            job.cancel()  # a no-op once finished; frees the slot if the client left

    async def _stream(
        self, answer: openai.Answer, events: JobEvents, request_id: str
    ) -> AsyncIterator[bytes]:
        # Starlette iterates this in a task of its own, outside the endpoint's log context.
        with structlog.contextvars.bound_contextvars(http="stream", request_id=request_id):
            for frame in answer.opening():
                yield frame
            try:
                async for event in events.timed(self._keepalive_s):
                    if event is None:
                        yield openai.KEEPALIVE
                    elif isinstance(event, GenerationResult):
                        for frame in answer.closing(event):
                            yield frame
                        return
                    else:
                        yield answer.content(event)
            except Exception as exc:  # after the 200 went out: an error event ends the stream
                _log_failure(exc)
                yield openai.sse_error(exc)

    async def _whole(self, answer: openai.Answer, events: JobEvents, request: Request) -> Response:
        texts: list[str] = []
        result: GenerationResult | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, request, events.job)
            async for event in events.timed(None):
                if isinstance(event, GenerationResult):
                    result = event
                elif event is not None:
                    texts.append(event.text)
            group.cancel_scope.cancel()
        if result is None:  # the client went away and its job was cancelled
            return Response(status_code=499)
        return JSONResponse(answer.whole("".join(texts), result))

    # ------------------------------------------------------------------ plumbing

    def _require_serving(self) -> tuple[Worker, Callable[[], StatsSnapshot]]:
        if self.state == "loading" or self.worker is None or self.snapshot is None:
            raise ShuttingDownError("the daemon is loading its models; retry shortly")
        if self.state == "stopping":
            raise ShuttingDownError("the daemon is shutting down")
        return self.worker, self.snapshot


def error_json(exc: BaseException, request_id: str = "") -> JSONResponse:
    status, body = openai.error_response(exc)
    if isinstance(exc, BodyTooLarge):  # a transport limit, not a field's value
        status, body["error"]["code"] = 413, "body_too_large"
    _log_failure(exc, status)
    if status == 500 and request_id:
        body["error"]["message"] += f" (request {request_id})"
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _log_failure(exc: BaseException, status: int | None = None) -> None:
    if status is None:
        status = openai.error_response(exc)[0]
    if status >= 500 and status != 503:
        log.error("http_internal_error", error=repr(exc), exc_info=exc)
    else:
        log.info("http_rejected", status=status, error=str(exc))


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 as OpenAI error bodies."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    body = openai.error_body(message, "invalid_request_error", None, code)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def read_json(request: Request, limit: int) -> tuple[Any, int]:
    """The body as JSON, and its size; read up to `limit` bytes (413 past it)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks)), size
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError("body", f"is not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidRequestError("body", "is nested too deeply") from None


class BodyTooLarge(InvalidRequestError):
    def __init__(self, limit: int) -> None:
        super().__init__("body", f"is larger than {limit} bytes (server.http_max_body_bytes)")


class JobEvents:
    """A worker job's events on the event loop: the job delivers each one straight into an
    asyncio queue (`Job.deliver_to`), so no thread sits between the worker and the socket."""

    def __init__(self, job: GenerateJob) -> None:
        self.job = job
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

        def sink(item: object) -> None:  # runs in the worker thread
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody reads any more
                job.cancel()

        job.deliver_to(sink)

    async def timed(self, every_s: float | None) -> AsyncIterator[Any]:
        """Events until the job ends; None after each `every_s` seconds without one."""
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                item = None
                with anyio.move_on_after(every_s):
                    item = await self._queue.get()
                if item is None:
                    yield None
                    continue
            if item is JOB_END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


async def _cancel_on_disconnect(request: Request, job: GenerateJob) -> None:
    """A non-streamed request whose client leaves: cancel its job (the body is read already,
    so the next message from the server is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


class SSEResponse(StreamingResponse):
    """text/event-stream whose `on_close` runs however the response ends, including a client
    that left before the first byte (then Starlette never starts the body iterator)."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# ---------------------------------------------------------------------- security


def _refused(status: int, message: str, code: str) -> Response:
    """A refusal of the transport's own (Host, Origin, media type): no domain error kind."""
    log.info("http_refused", status=status, code=code)
    body = openai.error_body(message, "invalid_request_error", None, code)
    return JSONResponse(body, status_code=status)


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The name in a Host header or an origin's netloc, without its port."""
    if value.startswith("["):  # [::1]:8421
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """The security rules (module docstring), as plain ASGI middleware so they run before any
    route and for streamed responses too."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Iterable[str],
        allowed_origins: Iterable[str],
        api_key: str | None,
    ) -> None:
        self.app = app
        self.hosts = {h.lower() for h in allowed_hosts}
        self.origins = set(allowed_origins)
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> Response | None:
        host = headers.get("host", "")
        name = split_host(host).lower()
        if not (is_loopback_host(name) or name in self.hosts):
            return _refused(
                403,
                f"Host {host[:100]!r} is not this server's name; requests must address it by a "
                "loopback name (or one in server.http_allowed_hosts)",
                "host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            same = origin.split("://", 1)[-1] == host
            if not same:
                return _refused(
                    403,
                    f"cross-origin requests from {origin[:100]!r} are not allowed (add it to "
                    "server.http_cors_origins to allow it)",
                    "origin_not_allowed",
                )
        if scope["method"] == "OPTIONS":  # a CORS preflight: CORSMiddleware answers it
            return None
        open_path = scope["path"] in _OPEN_PATHS or (
            scope["method"] == "GET" and scope["path"] in _PAGE_PATHS
        )
        if self.key is not None and not open_path:
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.key
            ):
                what = "a wrong API key" if given else "no API key"
                message = f"{what}: send 'Authorization: Bearer <key>' with the daemon's API key"
                response = error_json(UnauthenticatedError(message))
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                return _refused(
                    415,
                    f"Content-Type must be application/json, got {kind or 'none'!r}",
                    "unsupported_media_type",
                )
        return None
