"""From OpenAI requests to engine requests, and from engine deltas back to OpenAI responses.

Both endpoints share the pieces here: sampling parameters, the chat prompt, collecting a whole answer
(aborting it if the client disconnects first) and streaming it as server-sent events (aborting it when
the stream is cancelled by a disconnect).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from pydantic import BaseModel

from ..engine.sequence import SamplingParams
from .engine_loop import Delta, GenerationRequest, RequestHandle, TokenInfo
from .errors import APIError, InvalidRequest
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, Usage
from .responses import CompletionFormat


class ClientDisconnected(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


GREEDY_BELOW = 1e-5  # a smaller temperature samples greedily (logits / 1e-40 overflow to inf, as in vLLM)


def sampling_params(req: SamplingFields, prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's SamplingParams of a request (max_tokens and seed are set per choice by the bridge);
    prompt_logprobs: top log-probabilities per prompt token (None: the prompt is not scored)."""
    temperature = 1.0 if req.temperature is None else req.temperature
    try:
        # max_tokens is set per choice by the bridge (which checks min_tokens against it): a stand-in here
        return SamplingParams(max_tokens=max(req.min_tokens, 1), min_tokens=req.min_tokens,
                              min_p=req.min_p or 0.0, temperature=0.0 if temperature < GREEDY_BELOW else temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, seed=req.seed,
                              stop=tuple(req.stop_list), stop_token_ids=tuple(req.stop_token_ids or ()),
                              ignore_eos=req.ignore_eos, logprobs=req.wanted_logprobs,
                              presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                              repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                              prompt_logprobs=prompt_logprobs,
                              logit_bias={int(t): b for t, b in (req.logit_bias or {}).items()})
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def completion_request(req: CompletionRequest) -> GenerationRequest:
    return GenerationRequest(req.prompts(), sampling_params(req, req.wanted_prompt_logprobs), req.n, req.max_tokens,
                             echo=bool(req.echo))


def chat_request(req: ChatCompletionRequest, tokenizer: Any, chat_template: str | None) -> GenerationRequest:
    prompt = render_chat(tokenizer, req, chat_template)
    return GenerationRequest([prompt], sampling_params(req), req.n, req.token_limit, add_special_tokens=False)


def render_chat(tokenizer: Any, req: ChatCompletionRequest, chat_template: str | None) -> str:
    """The conversation as one prompt, through the tokenizer's chat template (or the server's
    --chat-template), ending with the assistant's turn opened."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model's tokenizer has no chat template: use /v1/completions, or start the "
                             "server with --chat-template FILE", param="messages")
    from jinja2 import TemplateError

    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:
        raise InvalidRequest(f"the chat template refused these messages: {exc}", param="messages") from None


@dataclass
class ChoiceResult:
    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenInfo] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.num_tokens = delta.num_tokens
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.logprobs += delta.logprobs


def usage_of(handle: RequestHandle, choices: list[ChoiceResult]) -> Usage:
    return Usage.of(sum(handle.prompt_tokens), sum(c.num_tokens for c in choices))


async def _until_disconnect(receive: Callable[[], Any]) -> None:
    """Return once the client has gone (the body was read already, so only http.disconnect comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(handle: RequestHandle, receive: Callable[[], Any]) -> list[ChoiceResult]:
    """The whole answer of every choice; aborts the request and raises ClientDisconnected when the
    client disconnects first."""
    choices = [ChoiceResult() for _ in range(handle.request.num_sequences)]

    async def consume() -> None:
        async for deltas in handle:
            for d in deltas:
                choices[d.index].add(d)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled from outside (server shutdown): stop the generation too
        handle.abort()
        consumer.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if consumer not in done:
        handle.abort()
        consumer.cancel()
        raise ClientDisconnected()
    consumer.result()  # re-raises an engine failure
    return choices


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def stream(handle: RequestHandle, fmt: CompletionFormat, include_usage: bool = True) -> AsyncIterator[str]:
    """Server-sent events: ``fmt.first()`` (if any), one chunk per engine step, a usage chunk (if
    wanted), then ``[DONE]``. A failure mid-stream is sent as an
    error event. When the client disconnects the stream is cancelled and ``finally`` aborts the request,
    which frees its KV blocks."""
    choices = [ChoiceResult() for _ in range(handle.request.num_sequences)]
    try:
        first = fmt.first()
        if first is not None:
            yield sse(first)
        async for deltas in handle:
            for d in deltas:
                choices[d.index].add(d)
            yield sse(fmt.chunk(deltas))
        if include_usage:
            yield sse(fmt.usage_chunk(usage_of(handle, choices)))
    except APIError as exc:
        yield sse(exc.body())
    finally:
        handle.abort()
    yield "data: [DONE]\n\n"
