"""A stand-in for an OpenAI-compatible completions server (raw ASGI, no framework): what the serving
benchmark's client needs and nothing more. Run as a script to serve it on a port:

    python tests/bench/fake_openai_server.py --port 8123

POST /v1/completions with ``stream``: one SSE chunk per output token (``token_delay`` seconds apart), a
usage chunk, ``[DONE]``. A prompt holding a token id >= VOCAB gets a 400, like a real server. Every
request body is kept in ``app.bodies`` for the tests.
"""

from __future__ import annotations

import asyncio
import json

VOCAB = 1000
MODEL = "fake-model"


class FakeCompletions:
    def __init__(self, token_delay: float = 0.001):
        self.token_delay = token_delay
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                if (await receive())["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    return await send({"type": "lifespan.shutdown.complete"})
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            return await _json(send, 200, {})
        if method == "GET" and path == "/v1/models":
            return await _json(send, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        if method != "POST" or path != "/v1/completions":
            return await _json(send, 404, {"error": {"message": "not found"}})
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        body = json.loads(raw)
        self.bodies.append(body)
        prompt, n = body["prompt"], body["max_tokens"]
        if max(prompt) >= VOCAB:
            return await _json(send, 400, {"error": {"message": "prompt token ids out of range"}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(n):
            await asyncio.sleep(self.token_delay)
            chunk = {"object": "text_completion", "model": MODEL, "choices": [{"index": 0, "text": "x"}]}
            await _event(send, chunk)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
        await _event(send, {"object": "text_completion", "model": MODEL, "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _event(send, obj: dict) -> None:
    await send({"type": "http.response.body", "body": f"data: {json.dumps(obj)}\n\n".encode(), "more_body": True})


async def _json(send, status: int, obj: dict) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(obj).encode()})


if __name__ == "__main__":
    import argparse

    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    uvicorn.run(FakeCompletions(), host="127.0.0.1", port=ap.parse_args().port, log_level="warning")
