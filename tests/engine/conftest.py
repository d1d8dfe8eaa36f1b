"""Helpers for the engine tests: a greedy reference by repeated full-sequence forwards."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton-backend engine test runs the kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

PROMPTS = ["the quick brown fox jumps", "seven wizards quietly judge boxing matches under silver moons and river "
           "stones carry old songs toward distant hills while the lazy dog", "a"]


def _greedy_reference(model, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode by re-running the full-sequence forward: (tokens, logits fp32 [n, V])."""
    ids, rows = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].float()
            rows.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):], torch.stack(rows)


@pytest.fixture
def load(tiny_model):
    """load(arch, **load_model kwargs) -> LoadedModel of a fresh tiny random model (float32, CPU)."""
    from atomq.model.loader import load_model

    def make(arch: str = "llama", **kw):
        return load_model(str(tiny_model(arch)), **kw)

    return make


@pytest.fixture
def greedy_reference():
    """greedy_reference(model, prompt_ids, n) -> (tokens, logits fp32 [n, V]) by full forwards."""
    return _greedy_reference


@pytest.fixture
def prompts() -> list[str]:
    return list(PROMPTS)
