"""``atomq serve`` as a real process: loopback by default, the key from $ATOMQ_API_KEY, SIGTERM drains."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from atomq.cli import build_parser

KEY = "sk-cli-test"


def test_serve_defaults_to_loopback():
    ns = build_parser().parse_args(["serve", "--model", "smollm2"])
    assert (ns.host, ns.port, ns.api_key) == ("127.0.0.1", 8000, None)


def test_without_the_serve_extras_atomq_imports_and_serve_says_what_to_install():
    code = ("import sys; sys.modules['fastapi'] = None; import atomq.serve, atomq.cli; "
            "sys.exit(atomq.cli.main(['serve', '--model', 'smollm2']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "needs the serve extras (fastapi is missing): pip install 'atomq[serve]'" in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_atomq_serve_process(tiny_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "atomq.cli", "serve", "--model", str(tiny_dir), "--port", str(port),
           "--max-model-len", "256", "--kv-cache-bytes", str(1 << 20), "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "ATOMQ_API_KEY": KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == tiny_dir.name

        body = {"prompt": "the lazy dog", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=60) as res:
            lines = res.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)  # shutdown drains: the stream still runs to its end
            events = [json.loads(line[6:]) for line in [first, *lines] if line.startswith("data: {")]
        assert events[-1]["usage"]["completion_tokens"] == 200
        # after the drain uvicorn re-raises the signal, so the exit status still says "terminated"
        assert proc.wait(60) == -signal.SIGTERM
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
