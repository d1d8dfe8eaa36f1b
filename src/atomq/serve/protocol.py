"""The OpenAI wire format: request and response bodies as pydantic models.

Requests are validated strictly (a string is not a number, a bool is not an integer, NaN is refused), so
a wrong type is a 400 rather than a surprise. Unknown fields are ignored, as OpenAI clients send extras;
known OpenAI fields this server does not implement (logprobs, echo, suffix, penalties, logit_bias, tools)
are refused with a 400 when set. Extensions beyond OpenAI's API, as in vLLM: ``top_k``, ``ignore_eos``,
``stop_token_ids``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_serializer, model_validator

MAX_N = 128  # choices per prompt
MAX_STOP = 16  # stop strings per request
INT64 = dict(ge=-(2**63), le=2**63 - 1)

FinishReason = Literal["stop", "length", "abort"]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = Field(True, description="send a last chunk with token counts (default true here)")


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="the served model's id (default: the one served)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (default 1)")
    n: StrictInt = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = Field(
        None, description="strings that end a choice (not included in its text)")
    seed: StrictInt | None = Field(None, **INT64, description="choice i samples with seed + i")
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported")
    user: str | None = None
    top_k: StrictInt = Field(0, ge=0, description="extension: keep the k most likely tokens (0 = off)")
    ignore_eos: bool = Field(False, description="extension: keep generating past the end-of-sequence token")
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]] | None = Field(
        None, max_length=MAX_STOP, description="extension: token ids that end a choice")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def _refuse_unsupported(self, extra: dict[str, Any]) -> None:
        """Raise for OpenAI features this server does not implement, when a request sets them."""
        used = {"presence_penalty": self.presence_penalty not in (None, 0),
                "frequency_penalty": self.frequency_penalty not in (None, 0),
                "logit_bias": bool(self.logit_bias), **extra}
        names = [name for name, on in used.items() if on]
        if names:
            raise ValueError(f"not supported by this server: {', '.join(names)}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is None or self.stream_options.include_usage


TokenIds = list[StrictInt]
Prompt = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: StrictInt | None = Field(16, ge=1, description="tokens to generate per choice (null: up to the context)")
    echo: bool = Field(False, description="not supported")
    logprobs: StrictInt | None = Field(None, description="not supported")
    suffix: str | None = Field(None, description="not supported")
    best_of: StrictInt | None = Field(None, description="only equal to n is supported")

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        self._refuse_unsupported({"echo": self.echo, "logprobs": self.logprobs is not None,
                                  "suffix": bool(self.suffix), "best_of": self.best_of not in (None, self.n)})
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        if isinstance(self.prompt, list) and any(isinstance(p, list) and not p for p in self.prompt):
            raise ValueError("a token-id prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or token list each."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Request):
    type: str = Field(description='only "text" parts are supported')
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" or part.text is None for part in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="tokens per choice (default: up to the context)")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = Field(None, description="not supported")
    top_logprobs: StrictInt | None = Field(None, description="not supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported")
    tool_choice: Any = Field(None, description="not supported")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"} is supported')

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        fmt = (self.response_format or {}).get("type", "text")
        self._refuse_unsupported({"logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs is not None,
                                  "tools": bool(self.tools), "tool_choice": self.tool_choice not in (None, "none"),
                                  "response_format": fmt != "text"})
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree")
        for m in self.messages:
            m.text()
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ------------------------------------------------------------------------------------------ responses
def unix_now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="always set, except on the chunks of a stream before the last")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A stream's increment; unset fields are left out of the JSON (the role comes only first)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=unix_now)
    owned_by: str = "atomq"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
