"""The app's OpenAPI document, made exact: validation errors are the 400s they are (FastAPI documents
422s), and a streamed answer is documented event by event (an OpenAI chunk, an error, or ``[DONE]``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import ChatCompletionChunk, CompletionResponse, ErrorResponse

STREAMS = {"/v1/completions": CompletionResponse, "/v1/chat/completions": ChatCompletionChunk}
_REF = "#/components/schemas/{model}"


def _event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event: its data is ``[DONE]`` or JSON (a chunk, or an error mid-stream)."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)},
                                             {"$ref": _REF.format(model=ErrorResponse.__name__)}]}}
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}


def refine(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite FastAPI's generated document in place (and return it)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    _, defs = models_json_schema([(m, "serialization") for m in (*STREAMS.values(), ErrorResponse)],
                                 ref_template=_REF)
    for name, definition in defs.get("$defs", {}).items():
        components.setdefault(name, definition)
    for path, chunk in STREAMS.items():
        ok = schema["paths"][path]["post"]["responses"]["200"]
        ok.setdefault("content", {})["text/event-stream"] = {"schema": _event_schema(chunk)}
    return schema
