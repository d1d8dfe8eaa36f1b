"""Programmatic dependent launch switches (kernels/pdl.py): on only for CUDA devices of sm_90 and later,
outside the interpreter, unless ATOMQ_PDL=0. The kernels' behaviour under it is checked on the GPU
(bench/gpu_engine_check.py: every method's kernels = reference, CUDA-graph decode = eager)."""

import pytest
import torch

from atomq.kernels import pdl


@pytest.fixture(autouse=True)
def _fresh_cache():
    pdl._enabled.cache_clear()
    yield
    pdl._enabled.cache_clear()


def test_off_on_the_cpu():
    assert pdl.launch_options(torch.device("cpu")) == {"USE_GDC": False}


def test_off_when_asked_or_interpreting(monkeypatch):
    monkeypatch.setenv("ATOMQ_PDL", "0")
    assert pdl.launch_options(torch.device("cuda", 0)) == {"USE_GDC": False}  # decided before any CUDA call
    pdl._enabled.cache_clear()
    monkeypatch.setenv("ATOMQ_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.launch_options(torch.device("cuda", 0)) == {"USE_GDC": False}


@pytest.mark.gpu
def test_on_for_hopper_gpu():
    on = torch.cuda.get_device_capability(0)[0] >= 9
    assert pdl.launch_options(torch.device("cuda")) == ({"USE_GDC": True, "launch_pdl": True} if on else {"USE_GDC": False})
