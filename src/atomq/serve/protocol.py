"""The OpenAI wire format: request and response bodies as pydantic models.

Requests are validated strictly (a string is not a number, a bool is not an integer, NaN is refused), so
a wrong type is a 400 rather than a surprise. Unknown fields are ignored, as OpenAI clients send extras;
known OpenAI fields this server does not implement (suffix, best_of, tools, response formats)
are accepted only with their "off" values and otherwise refused with a 400. Completions take ``echo``
(the prompt before each choice's text; with ``logprobs``, the prompt tokens' log-probabilities before the
completion's, null for the first token) and, with echo only, ``max_tokens: 0`` (the prompt alone, as legacy
OpenAI clients ask for log-likelihoods; lm-eval-harness's local-completions sends ``max_tokens: 1`` and
reads the prompt's entries). Extensions beyond OpenAI's API, as in vLLM: ``top_k``,
``min_p``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``repetition_penalty``; ``logprobs`` /
``top_logprobs`` go up to 20 (vLLM's limit; OpenAI's completions take 5). Log-probabilities are of the
model's distribution before penalties, ``logit_bias``, temperature, top-k and top-p; one that underflows
fp32 is reported as -9999.0 (JSON has no -inf). ``logit_bias`` keys are token ids as decimal strings (as
OpenAI's); an id outside the vocabulary is a 400.

(No ``from __future__ import annotations`` here: the field types are built by calls, Int(ge=1) etc.)
"""

import time
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictInt,
                      StrictStr, Tag, WithJsonSchema, model_serializer, model_validator)

from ..engine.sequence import MAX_LOGIT_BIAS, MAX_LOGPROBS

MAX_N = 128  # choices per prompt
MAX_STOP = 16  # stop strings per request
MAX_LOGIT_BIAS_TOKENS = 1024  # logit_bias entries per request

FinishReason = Literal["stop", "length", "abort"]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


def _json_integer(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (JSON Schema agrees), "2" and true are not."""
    return int(value) if type(value) is float and value.is_integer() else value


def Int(**constraints: Any) -> Any:
    """A JSON integer with constraints (ge, le, ...): not a string, not a bool; 2.0 counts as 2."""
    return Annotated[StrictInt, Field(**constraints), BeforeValidator(_json_integer)]


TokenId = Int(ge=0, le=2**63 - 1)


def _token_id_key(key: str) -> str:
    """A JSON object key naming a token id: decimal digits without leading zeros (so that no two keys name
    the same token), at most 19 of them (logit_bias)."""
    if not key.isascii() or not key.isdigit() or len(key) > 19 or (key != "0" and key.startswith("0")):
        raise ValueError(f"{key[:24]!r} is not a token id")
    return key


TokenIdKey = Annotated[StrictStr, AfterValidator(_token_id_key)]


def _str_or_list(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else None


def _prompt_shape(value: Any) -> str | None:
    """"str", "list[str]", "list[list]" or "list" (token ids, or anything else in a list)."""
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return "list[str]"
    if isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        return "list[list]"
    return _str_or_list(value)


def OneOf(what: str, members: dict[str, Any], shape: Any = _str_or_list) -> Any:
    """A union whose member is picked by ``shape(value)`` (a key of ``members``), so that a mistake is
    reported against that member only, and a value of no known shape as "must be <what>"."""
    return Annotated[Union[tuple(Annotated[t, Tag(k)] for k, t in members.items())],
                     Discriminator(shape, custom_error_type="invalid_shape", custom_error_message=f"must be {what}")]


def _same(value: Any, allowed: Any) -> bool:
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    if isinstance(value, (int, float)) and isinstance(allowed, (int, float)):
        return value == allowed
    return type(value) is type(allowed) and value == allowed


def Unsupported(*allowed: Any) -> Any:
    """The type of an OpenAI field this server does not implement: null, or one of ``allowed`` (the
    values that mean "off"); anything else is refused as "not supported by this server"."""

    def check(value: Any) -> Any:
        if value is None or any(_same(value, a) for a in allowed):
            return value
        raise ValueError("not supported by this server")

    schema = {"anyOf": [{"type": "null"}, *({"const": a} for a in allowed)], "description": "not supported"}
    return Annotated[Any, AfterValidator(check), WithJsonSchema(schema)]


Stop = OneOf("a string or a list of strings",
             {"str": NonEmptyStr, "list": Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)]})
# "off" values of OpenAI fields this server does not implement, as types (see Unsupported)
NoSuffix, NoToolChoice, TextFormat = Unsupported(""), Unsupported("none"), Unsupported({"type": "text"})


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = Field(True, description="send a last chunk with token counts (default true here)")


class SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="the served model's id (default: the one served)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 (or below 1e-5) = greedy (default 1)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (default 1)")
    n: Int(ge=1, le=MAX_N) = Field(1, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    stop: Stop | None = Field(None, description="strings that end a choice (not included in its text)")
    seed: Int(ge=-(2**63), le=2**63 - 1) | None = Field(None, description="choice i samples with seed + i")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="subtract from the logits of tokens "
                                           "already in the output (default 0)")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="subtract, times their count, from "
                                            "the logits of tokens already in the output (default 0)")
    repetition_penalty: float | None = Field(None, ge=1e-3, le=1e3, description="extension: divide positive "
                                             "(multiply negative) logits of prompt and output tokens (default 1 = off)")
    logit_bias: dict[TokenIdKey, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS_TOKENS, description="token id (a decimal string) -> bias in [-100, 100] "
        "added to its logit before sampling (-100 all but bans it, +100 all but forces it)")
    user: str | None = None
    top_k: Int(ge=0) = Field(0, description="extension: keep the k most likely tokens (0 = off)")
    min_p: float | None = Field(None, ge=0, le=1, description="extension: keep the tokens at least min_p times as "
                                "likely as the most likely one (default 0 = off)")
    min_tokens: Int(ge=0) = Field(0, description="extension: no end-of-sequence or stop token id before this many "
                                  "tokens")
    ignore_eos: bool = Field(False, description="extension: keep generating past the end-of-sequence token")
    stop_token_ids: list[TokenId] | None = Field(
        None, max_length=MAX_STOP, description="extension: token ids that end a choice")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is None or self.stream_options.include_usage

    @model_validator(mode="after")
    def _check_stream_options(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = OneOf("a string, a list of strings, a list of token ids or a list of token-id lists",
               {"str": NonEmptyStr, "list[str]": Annotated[list[NonEmptyStr], Field(min_length=1)], "list": TokenIds,
                "list[list]": Annotated[list[TokenIds], Field(min_length=1)]},
               _prompt_shape)


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
    max_tokens: Int(ge=0) | None = Field(16, description="tokens to generate per choice (null: up to the context; "
                                         "0: only with echo, the prompt alone)")
    best_of: Unsupported(1) = None
    echo: bool | None = Field(False, description="each choice's text starts with the prompt; with logprobs, so do "
                                                 "its log-probabilities (null for the first prompt token)")
    logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="also return each token's log-probability and those of this many most likely tokens")
    suffix: NoSuffix = None

    @model_validator(mode="after")
    def _check_max_tokens(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo: true (the prompt alone)")
        return self

    @property
    def wanted_logprobs(self) -> int | None:
        """Top log-probabilities per token the engine should report (None: none at all)."""
        return self.logprobs

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        """Top log-probabilities per prompt token the engine should report (with echo only)."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or token list each."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Request):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: StrictStr


MessageContent = OneOf("a string or a list of text parts", {"str": StrictStr, "list": list[TextPart]})


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int(ge=1) | None = Field(None, description="tokens per choice (default: up to the context)")
    max_completion_tokens: Int(ge=1) | None = Field(None, description="the newer name of max_tokens")
    logprobs: bool | None = Field(None, description="return each output token's log-probability")
    top_logprobs: Int(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="with logprobs: also this many most likely tokens per position")
    tools: Unsupported([]) = None
    tool_choice: NoToolChoice = None
    response_format: TextFormat = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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


class CompletionLogprobs(BaseModel):
    """Per generated token (legacy completions format): its text, log-probability, the most likely
    tokens' texts and log-probabilities (with the sampled token's), and where its text starts in the
    token texts concatenated (a multi-byte character split over tokens shows as U+FFFD in each). With
    echo the prompt's tokens come first, the first of them with null log-probabilities."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="the token's exact bytes (part of a UTF-8 character, where the text "
                                         "shows U+FFFD)")


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
