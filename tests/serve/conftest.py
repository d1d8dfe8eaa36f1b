"""Fixtures of the serve tests: one tiny random Llama (with a chat template) and live servers over it."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from live import CHAT_TEMPLATE, serving  # noqa: E402


def _make_tiny_model():
    """tests/conftest.py's make_tiny_model (loaded by path: every conftest module is named 'conftest')."""
    spec = importlib.util.spec_from_file_location("_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    """One tiny random Llama for the whole serve session (tiny_model makes one per test)."""
    return _make_tiny_model()(tmp_path_factory.mktemp("serve") / "tiny-llama", "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    """A LoadedModel whose tokenizer has CHAT_TEMPLATE (shared: servers only read the model)."""
    from atomq.model.loader import load_model

    lm = load_model(str(tiny_dir))
    lm.tokenizer.chat_template = CHAT_TEMPLATE
    return lm


@pytest.fixture
def live_server(tiny_lm):
    """live_server(**options) -> LiveServer (see live.serving), stopped at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(serving(tiny_lm, **options))


@pytest.fixture(scope="module")
def server(tiny_lm):
    """A default server shared by a module's tests."""
    with serving(tiny_lm) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    """The official openai client of the module's server."""
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c
