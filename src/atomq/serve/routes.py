"""The endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .engine_loop import AsyncEngine, GenerationRequest, RequestHandle
from .errors import ModelNotFound, ServiceUnavailable
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       ErrorResponse, Health, ModelCard, ModelList, SamplingFields)
from .responses import ChatFormat, CompletionFormat
from .serving import chat_request, collect, completion_request, stream, usage_of


@dataclass
class ServerState:
    """What the routes need, kept on ``app.state.atomq``."""

    bridge: AsyncEngine
    model_name: str
    max_model_len: int
    tokenizer: Any
    chat_template: str | None
    metrics: ServerMetrics


def _state(request: Request) -> ServerState:
    return request.app.state.atomq


def _json(model: Any) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in [
    (400, "malformed JSON, a wrong type or value, a prompt the model cannot take"),
    (401, "missing or wrong API key (when the server has one)"),
    (404, "unknown model"),
    (429, "the waiting queue is full; retry later"),
    (503, "the server is shutting down")]}
_SSE = {200: {"description": "JSON, or server-sent events with stream: true (openapi.py documents them)"}}

router = APIRouter()


@router.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
async def health(request: Request) -> Response:
    """Liveness: 200 while the engine thread runs (open even when the server has an API key)."""
    if not _state(request).bridge.is_alive:
        raise ServiceUnavailable("the engine is not running")
    return _json(Health())


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition: requests, tokens, queue length, KV usage, latency histograms."""
    body, content_type = _state(request).metrics.render()
    return Response(body, media_type=content_type)


def _card(s: ServerState) -> ModelCard:
    return ModelCard(id=s.model_name, max_model_len=s.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> Response:
    return _json(ModelList(data=[_card(_state(request))]))


def _check_model(s: ServerState, model: str | None) -> None:
    """A request may leave the model out; naming another one is a 404."""
    if model is not None and model != s.model_name:
        raise ModelNotFound(f"the model '{model}' does not exist; this server serves '{s.model_name}'",
                            param="model")


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model: str, request: Request) -> Response:
    s = _state(request)
    _check_model(s, model)
    return _json(_card(s))


async def _admit(s: ServerState, gen: GenerationRequest, request_id: str) -> RequestHandle:
    handle = s.bridge.submit(gen, request_id)
    try:
        await handle.admitted()
    except BaseException:
        handle.abort()
        raise
    return handle


async def _generate(request: Request, body: SamplingFields, gen: GenerationRequest,
                    fmt: CompletionFormat) -> Response:
    """Run one generation request and answer it whole, or as server-sent events."""
    handle = await _admit(_state(request), gen, fmt.id)
    if body.stream:
        events = stream(handle, fmt, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices = await collect(handle, request.receive)
    return _json(fmt.whole(choices, usage_of(handle, choices)))


@router.post("/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, **_SSE})
async def completions(body: CompletionRequest, request: Request) -> Response:
    s = _state(request)
    _check_model(s, body.model)
    gen = completion_request(body)
    fmt = CompletionFormat(s.model_name, gen.num_sequences, logprobs=body.wanted_logprobs is not None)
    return await _generate(request, body, gen, fmt)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_ERRORS, **_SSE})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    s = _state(request)
    _check_model(s, body.model)
    gen = chat_request(body, s.tokenizer, s.chat_template)
    fmt = ChatFormat(s.model_name, gen.num_sequences, logprobs=body.wanted_logprobs is not None)
    return await _generate(request, body, gen, fmt)
