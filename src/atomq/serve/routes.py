"""The endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from .engine_loop import AsyncEngine, Delta, RequestHandle
from .errors import ModelNotFound, NotFound, ServiceUnavailable
from .metrics import ServerMetrics
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, CompletionChoice, CompletionRequest, CompletionResponse, DeltaMessage,
                       ErrorResponse, Health, ModelCard, ModelList, SamplingFields, unix_now)
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


@router.get("/v1/models/{model}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model: str, request: Request) -> Response:
    s = _state(request)
    if model != s.model_name:
        raise NotFound(f"the model '{model}' does not exist; this server serves '{s.model_name}'", param="model",
                       code="model_not_found")
    return _json(_card(s))


def _check_model(s: ServerState, req: SamplingFields) -> None:
    if req.model is not None and req.model != s.model_name:
        raise ModelNotFound(f"the model '{req.model}' does not exist; this server serves '{s.model_name}'",
                            param="model")


async def _admit(s: ServerState, gen: Any, request_id: str) -> RequestHandle:
    handle = s.bridge.submit(gen, request_id)
    try:
        await handle.admitted()
    except BaseException:
        handle.abort()
        raise
    return handle


@router.post("/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, **_SSE})
async def completions(body: CompletionRequest, request: Request) -> Response:
    s = _state(request)
    _check_model(s, body)
    rid = f"cmpl-{uuid.uuid4().hex}"
    handle = await _admit(s, completion_request(body), rid)
    created = unix_now()

    def response(choices: list[CompletionChoice], usage: Any = None) -> CompletionResponse:
        return CompletionResponse(id=rid, created=created, model=s.model_name, choices=choices, usage=usage)

    if body.stream:
        def chunk(deltas: list[Delta]) -> CompletionResponse:
            return response([CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason)
                             for d in deltas])

        usage_chunk = (lambda usage: response([], usage)) if body.include_usage else None
        return StreamingResponse(stream(handle, chunk, usage_chunk), media_type="text/event-stream")
    results = await collect(handle, request.receive)
    choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in enumerate(results)]
    return _json(response(choices, usage_of(handle, results)))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_ERRORS, **_SSE})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    s = _state(request)
    _check_model(s, body)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    handle = await _admit(s, chat_request(body, s.tokenizer, s.chat_template), rid)
    created = unix_now()

    if body.stream:
        def chunk(choices: list[ChatChunkChoice], usage: Any = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=s.model_name, choices=choices, usage=usage)

        first = chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                       for i in range(body.n)])
        deltas_chunk = lambda deltas: chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text),  # noqa: E731
                                                             finish_reason=d.finish_reason) for d in deltas])
        usage_chunk = (lambda usage: chunk([], usage)) if body.include_usage else None
        return StreamingResponse(stream(handle, deltas_chunk, usage_chunk, first), media_type="text/event-stream")
    results = await collect(handle, request.receive)
    choices = [ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
               for i, c in enumerate(results)]
    return _json(ChatCompletionResponse(id=rid, created=created, model=s.model_name, choices=choices,
                                        usage=usage_of(handle, results)))
