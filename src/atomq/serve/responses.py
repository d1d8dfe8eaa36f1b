"""Response bodies of one request, whole or streamed, for each endpoint.

A format knows the request's id, creation time and model and turns the bridge's output into OpenAI
objects: ``first()`` (the chunk that opens a stream, if any), ``chunk(deltas)``, ``usage_chunk(usage)``
(the last chunk of a stream) and ``whole(choices, usage)`` (the non-streamed answer). With ``logprobs``
every choice carries its tokens' log-probabilities in the endpoint's own shape. Echoed prompts need
nothing of their own here: the bridge puts them at the start of each choice's first delta.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel

from .engine_loop import Delta, TokenInfo
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                       ChatLogprob, ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionResponse,
                       DeltaMessage, TopLogprob, Usage, unix_now)


class CompletionFormat:
    prefix = "cmpl"

    def __init__(self, model: str, num_choices: int, logprobs: bool = False):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created, self.model, self.num_choices, self.logprobs = unix_now(), model, num_choices, logprobs
        self._offsets = [0] * num_choices  # per choice: where the next token's text starts

    def _body(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _logprobs(self, index: int, tokens: tuple[TokenInfo, ...] | list[TokenInfo]) -> CompletionLogprobs | None:
        if not self.logprobs:
            return None
        offsets = []
        for t in tokens:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(t.text) if t.span is None else t.span
        return CompletionLogprobs(tokens=[t.text for t in tokens], token_logprobs=[t.logprob for t in tokens],
                                  top_logprobs=[_top_dict(t) for t in tokens], text_offset=offsets)

    def first(self) -> BaseModel | None:
        return None

    def chunk(self, deltas: list[Delta]) -> BaseModel:
        return self._body([CompletionChoice(index=d.index, text=d.text, logprobs=self._logprobs(d.index, d.logprobs),
                                            finish_reason=d.finish_reason) for d in deltas])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._body([], usage)

    def whole(self, choices: list[Any], usage: Usage) -> BaseModel:
        return self._body([CompletionChoice(index=i, text=c.text, logprobs=self._logprobs(i, c.logprobs),
                                            finish_reason=c.finish_reason) for i, c in enumerate(choices)], usage)


def _top_dict(t: TokenInfo) -> dict[str, float] | None:
    """The legacy completions shape: text -> logprob of the most likely tokens and the actual one (as
    OpenAI and vLLM give it); tokens with the same text keep the most likely one's value. None for an
    echoed prompt's first token."""
    if t.logprob is None:
        return None
    top: dict[str, float] = {}
    for text, _, logprob in (*t.top, (t.text, t.raw, t.logprob)):
        top.setdefault(text, logprob)
    return top


def _top(text: str, raw: bytes, logprob: float) -> TopLogprob:
    return TopLogprob(token=text, logprob=logprob, bytes=list(raw))


class ChatFormat(CompletionFormat):
    prefix = "chatcmpl"

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _logprobs(self, index: int, tokens: tuple[TokenInfo, ...] | list[TokenInfo]) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        return ChatLogprobs(content=[ChatLogprob(token=t.text, logprob=t.logprob, bytes=list(t.raw),
                                                 top_logprobs=[_top(*x) for x in t.top]) for t in tokens])

    def first(self) -> BaseModel:
        """The assistant's role for every choice, as OpenAI opens a chat stream."""
        return self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                            for i in range(self.num_choices)])

    def chunk(self, deltas: list[Delta]) -> BaseModel:
        return self._chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text),
                                            logprobs=self._logprobs(d.index, d.logprobs), finish_reason=d.finish_reason)
                            for d in deltas])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def whole(self, choices: list[Any], usage: Usage) -> BaseModel:
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=usage,
            choices=[ChatChoice(index=i, message=AssistantMessage(content=c.text), logprobs=self._logprobs(i, c.logprobs),
                                finish_reason=c.finish_reason) for i, c in enumerate(choices)])
