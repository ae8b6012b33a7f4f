"""`nanor1 serve MODEL`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and a browser chat page.

Every request joins the one engine's running batch (continuous batching, see worker.py); reasoning comes back
apart from the answer, as `reasoning_content`, as in DeepSeek's API. Run: `nanor1 serve runs/sft/final`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import re
import socket
import sys
import threading
import time
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanor1.common import NanoR1Error
from nanor1.engine import Engine, SamplingParams, StepOutput
from nanor1.serve import routes
from nanor1.serve.protocol import (APIError, ChatCompletion, ChatCompletionRequest, CompletionRequest,
                                   ErrorResponse, ModelCard, ModelList, ServeLimits, TextCompletion, error_body)
from nanor1.serve.worker import EngineLoop, Metrics

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500)}
_STREAM_DOC = {200: {"content": {"text/event-stream": {}}}}


# ----------------------------------------------------------------------------- the ASGI guard

class Guard:
    """Runs before FastAPI: the API key on /v1 routes, the body size cap, and per-request metrics. Checking
    here means a request without the key is refused before its body is even parsed."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            if error is None:
                body, error = await self._read_body(receive)
            if error is not None:
                await _send_json(send_tracked, error.status, error.body())
                return
            replayed = [False]

            async def replay():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: waits for http.disconnect

            await self.app(scope, replay, send_tracked)
        finally:
            self.metrics.observe_request(route, status[0], time.perf_counter() - t0)

    def _refuse(self, scope) -> APIError | None:
        if self.api_key is None or not scope["path"].startswith("/v1"):
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not token:
            return APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return APIError(401, "incorrect API key", code="invalid_api_key")
        return None

    async def _read_body(self, receive) -> tuple[bytes, APIError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(400, "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", APIError(400, f"request body is larger than this server's limit of {self.max_body} "
                                          "bytes; send a shorter prompt", code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ----------------------------------------------------------------------------- the app

class Server:
    """State behind the routes: the engine loop, tokenizer, limits and metrics."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, limits: ServeLimits):
        self.loop = EngineLoop(engine)
        self.tokenizer, self.model_name, self.limits = tokenizer, model_name, limits
        self.metrics = Metrics()
        self.created = int(time.time())
        self.tickets = itertools.count()
        self.in_flight = 0  # choices submitted and not yet finished or aborted
        context = engine.max_seq_len - 1
        self.max_prompt = min(limits.max_prompt_tokens or context, context)

    # -------------------------------------------------------------- request -> jobs
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param} is empty", param=param)
        if len(ids) > self.max_prompt:
            raise APIError(400, f"{param} is {len(ids)} tokens, more than this server's limit of {self.max_prompt}; "
                                "shorten it", param=param, code="context_length_exceeded")

    def sampling(self, req, n_prompts: int, max_tokens: int | None) -> list[SamplingParams]:
        lim = self.limits
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, name, None)
            if value is not None and value > lim.max_tokens:
                raise APIError(400, f"{name}={value} is more than this server's limit of {lim.max_tokens}",
                               param=name, code="max_tokens_too_large")
        max_tokens = max_tokens if max_tokens is not None else min(lim.default_max_tokens, lim.max_tokens)
        n = req.n if req.n is not None else 1
        if n * n_prompts > lim.max_n:
            raise APIError(400, f"{n * n_prompts} choices asked for (n={n} x {n_prompts} prompts); this server "
                                f"allows at most {lim.max_n} per request", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > lim.max_stop or any(not s or len(s) > 256 for s in stop):
            raise APIError(400, f"stop takes at most {lim.max_stop} non-empty strings of up to 256 characters",
                           param="stop")
        if self.in_flight + n * n_prompts > lim.max_waiting:
            raise APIError(429, f"the server has {self.in_flight} generations in progress; retry shortly",
                           type="rate_limit_error", code="server_busy")
        return [SamplingParams(max_new_tokens=max_tokens,
                               temperature=1.0 if req.temperature is None else req.temperature,
                               top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                               stop_strings=tuple(stop),
                               seed=None if req.seed is None else (req.seed + i) % (1 << 63))
                for i in range(n)]

    # -------------------------------------------------------------- running
    async def events(self, jobs: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, StepOutput) as the engine makes them; unfinished jobs are aborted on exit (a client
        that disconnects cancels this generator, which frees its slots at once)."""
        aloop, q = asyncio.get_running_loop(), asyncio.Queue()
        tickets = [next(self.tickets) for _ in jobs]
        t0 = time.perf_counter()

        def deliver(index: int, item) -> None:  # called in the engine thread
            try:
                aloop.call_soon_threadsafe(q.put_nowait, (index, item))
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

        open_ = set(range(len(jobs)))
        self.in_flight += len(jobs)
        first = True
        try:
            for i, (ticket, (ids, params)) in enumerate(zip(tickets, jobs)):
                self.loop.submit(ticket, ids, params, lambda item, i=i: deliver(i, item))
            while open_:
                index, item = await q.get()
                if isinstance(item, BaseException):
                    open_.discard(index)
                    status = 400 if isinstance(item, NanoR1Error) else 500
                    raise APIError(status, str(item), type="invalid_request_error" if status == 400
                                   else "server_error")
                if first:
                    self.metrics.observe_first_token(time.perf_counter() - t0)
                    first = False
                if item.finished:
                    open_.discard(index)
                yield index, item
        finally:
            for i in open_:
                self.loop.abort(tickets[i])
            if open_:
                self.metrics.add_aborted(len(open_))
            self.in_flight -= len(jobs)


def _chat_page() -> tuple[str, str]:
    """The page and a Content-Security-Policy that allows its one inline script (by hash) and nothing else."""
    html = resources.files("nanor1.serve").joinpath("chat.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI app around an engine; `serve()` runs it, tests build it around a tiny model."""
    srv = Server(engine, tokenizer, model_name, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.loop.start()
        yield
        srv.loop.stop()

    app = FastAPI(title="nanor1", description="OpenAI-compatible API of a nanor1 model", lifespan=lifespan)
    app.state.server = srv
    page, csp = _chat_page()

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"request body is not valid JSON ({err.get('ctx', {}).get('error', '')})",
                                           code="invalid_json"), status_code=400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {err.get('msg')}" if param else \
            "request body must be a JSON object (sent as Content-Type: application/json)"
        return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, code=str(exc.status_code)), status_code=exc.status_code,
                            headers=exc.headers)  # e.g. the Allow header of a 405

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"), 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer"})

    @app.get("/health")
    async def health():
        if srv.loop.alive or not engine.has_unfinished():
            return {"status": "ok", "model": model_name}
        return JSONResponse(error_body("the engine thread is not running", type="server_error"), 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        gauges = {"nanor1_queue_length": ("Requests waiting for a batch slot.", srv.loop.n_waiting),
                  "nanor1_running_requests": ("Requests decoding in the batch.", srv.loop.n_running),
                  "nanor1_in_flight_requests": ("Choices accepted and not yet finished.", srv.in_flight),
                  "nanor1_last_step_batch_size": ("Tokens made by the last engine step.", srv.loop.last_batch),
                  "nanor1_engine_steps_total": ("Engine steps since start.", srv.loop.steps)}
        return PlainTextResponse(srv.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models():
        return {"object": "list", "data": [routes.model_card(srv)]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard,
             responses=_ERRORS)
    async def model(model_id: str):
        srv.check_model(model_id)
        return routes.model_card(srv)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**_ERRORS, **_STREAM_DOC})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await routes.respond(srv, request, routes.chat_job(srv, body))

    @app.post("/v1/completions", response_model=TextCompletion, responses={**_ERRORS, **_STREAM_DOC})
    async def completions(body: CompletionRequest, request: Request):
        return await routes.respond(srv, request, routes.text_job(srv, body))

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, metrics=srv.metrics)
    app.openapi = lambda: app.openapi_schema or _spec(app, model_name, limits)
    return app


def _spec(app: FastAPI, model_name: str, limits: ServeLimits) -> dict:
    """FastAPI's OpenAPI spec, narrowed to this server: the one model name and the token and choice limits."""
    from fastapi.openapi.utils import get_openapi
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    caps = {"max_tokens": limits.max_tokens, "max_completion_tokens": limits.max_tokens, "n": limits.max_n}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = spec["components"]["schemas"][name]["properties"]
        props["model"]["enum"] = [model_name]
        for key, cap in caps.items():
            for branch in props.get(key, {}).get("anyOf", []):
                if branch.get("type") == "integer":
                    branch["maximum"] = cap
    app.openapi_schema = spec
    return spec


# ----------------------------------------------------------------------------- running it

def load_engine(path: str, device: str | None = None, max_batch: int = 32) -> tuple[Engine, object]:
    """An engine and tokenizer for a nanor1 checkpoint or run folder, or a local Hugging Face model."""
    from nanor1.common import resolve_device
    from nanor1.policy import load_policy
    policy = load_policy(path, device=resolve_device(device))
    policy.model.eval()
    return policy.engine(max_batch=max_batch), policy.tokenizer


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error when the address is taken (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NanoR1Error(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(2048)  # listening now makes the port busy for anyone else at once
    return sock


class BackgroundServer:
    """uvicorn in a daemon thread on a loopback port, for tests, benchmarks and `nanor1 chat --server`.
    Use as a context manager; `.url` is the base URL."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.sock = bind_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str | None = None, max_batch: int = 32, limits: ServeLimits | None = None,
          model_name: str | None = None, log_level: str = "info") -> None:
    """`nanor1 serve MODEL`: load the checkpoint and serve it until Ctrl-C. The API key comes from `api_key`
    or the NANOR1_API_KEY environment variable; without one, /v1 is open to whoever can reach the port."""
    import uvicorn
    api_key = api_key or os.environ.get("NANOR1_API_KEY") or None
    sock = bind_socket(host, port)  # a taken port fails before the model is loaded
    engine, tokenizer = load_engine(path, device, max_batch)
    name = model_name or os.path.basename(os.path.normpath(path))
    app = create_app(engine, tokenizer, name, api_key=api_key, limits=limits or ServeLimits())
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"nanor1 serve: warning: listening on {host} without an API key; set --api-key or NANOR1_API_KEY",
              file=sys.stderr)
    print(f"nanor1 serve: {name} on http://{host}:{sock.getsockname()[1]} (chat page at /, API at /v1)",
          file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])
