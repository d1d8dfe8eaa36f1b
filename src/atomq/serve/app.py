"""The OpenAI-compatible HTTP app: ``create_app(engine, model_name=...)`` -> FastAPI.

One process: the event loop serves HTTP, one thread runs the engine (engine_loop.AsyncEngine), started
and drained by the app's lifespan. Every client mistake is a 4xx with an OpenAI error body
(``{"error": {"message", "type", "param", "code"}}``); validation errors are 400 (not FastAPI's 422).
"""

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from .auth import BearerAuthMiddleware
from .engine_loop import AsyncEngine
from .errors import APIError, InvalidRequest
from .metrics import HTTPMetricsMiddleware, ServerMetrics
from .openapi import refine
from .routes import ServerState, router
from .serving import ClientDisconnected


def create_app(engine: Any, *, model_name: str, api_key: str | None = None, max_waiting: int = 256,
               chat_template: str | None = None, shutdown_timeout: float | None = None) -> FastAPI:
    """An app serving ``engine`` (an LLMEngine, e.g. ``LLM(...).engine``) under the id ``model_name``.

    api_key: when set, every endpoint but /health needs ``Authorization: Bearer <api_key>``;
    max_waiting: sequences that may wait beyond the engine's max_num_seqs before requests get 429;
    chat_template: a Jinja template used instead of the tokenizer's own;
    shutdown_timeout: on shutdown, abort what has not finished after this many seconds (None: wait).
    """
    metrics = ServerMetrics(routes=(*(route.path for route in router.routes), "/openapi.json", "/docs"))
    bridge = AsyncEngine(engine, max_waiting=max_waiting, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bridge.start()
        yield
        await bridge.shutdown(shutdown_timeout)

    app = FastAPI(title="atomq", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions over the atomq engine")
    app.state.atomq = ServerState(bridge, model_name, engine.max_model_len, engine.tokenizer, chat_template, metrics)
    app.include_router(router)
    _install_error_handlers(app)
    _refine_openapi(app)
    if api_key:
        app.add_middleware(BearerAuthMiddleware, api_key=api_key)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)  # outermost: counts 401s too
    return app


def _error(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    if exc.status == 429:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable one-line message and the first offending parameter of a validation error."""
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            return f"the body is not valid JSON ({reason} at character {err['loc'][-1]})", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            return "the body must be a JSON object", None
        if param is None and loc:
            param = loc[0]
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(InvalidRequest(message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        err = APIError(str(exc.detail), code=str(exc.status_code), status=exc.status_code)
        return _error(err, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(APIError(f"internal server error: {type(exc).__name__}", status=500, error_type="server_error"))


def _refine_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = refine(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi
