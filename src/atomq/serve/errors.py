"""Errors a client can be told about, each with its HTTP status and OpenAI-style ``type`` / ``code``.

The bridge and the routes raise these; app.py turns any of them into
``{"error": {"message", "type", "param", "code"}}`` with the status below. Nothing here imports FastAPI.
"""

from __future__ import annotations


class APIError(Exception):
    """Base: a request the server refuses or cannot finish, described to the client."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if error_type is not None:
            self.type = error_type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    """400: malformed JSON, a wrong type, an out-of-range value, a prompt the model cannot take."""


class AuthenticationFailed(APIError):
    status = 401
    code = "invalid_api_key"


class NotFound(APIError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class QueueFull(APIError):
    """429: the bounded waiting queue is full; retry later."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ServiceUnavailable(APIError):
    """503: the server is shutting down (draining) or its engine stopped."""

    status = 503
    type = "service_unavailable"
    code = "unavailable"


class EngineFailure(APIError):
    """500: the engine failed on a step (a server bug, never a client mistake)."""

    status = 500
    type = "server_error"
    code = "engine_error"
