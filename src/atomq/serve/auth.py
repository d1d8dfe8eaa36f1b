"""Bearer-key authentication as an ASGI middleware: every path but the open ones needs
``Authorization: Bearer <key>`` (the OpenAI clients' ``api_key``). Keys are compared in constant time."""

from __future__ import annotations

import hmac
import json
from typing import Any

from .errors import AuthenticationFailed


class BearerAuthMiddleware:
    def __init__(self, app: Any, api_key: str, open_paths: tuple[str, ...] = ("/health",)):
        if not api_key:
            raise ValueError("the API key must not be empty")
        self.app, self.open_paths = app, frozenset(open_paths)
        self._expected = b"bearer " + api_key.encode()

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return hmac.compare_digest(scheme.lower() + b" " + token.strip(), self._expected)
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._authorized(scope):
            return await self.app(scope, receive, send)
        err = AuthenticationFailed("missing or invalid API key: send the header 'Authorization: Bearer <key>'")
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
