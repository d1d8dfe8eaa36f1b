"""Rotation recipes: the rotated float model computes the same function; rotated checkpoints load and run.

Tiny random models (hidden 96 = 3 x 32, intermediate 160 = 5 x 32: sizes that are not powers of two).
"""

import dataclasses
import json

import pytest
import torch

from atomq.calib.pipeline import _layer_names, quantize_model
from atomq.calib.rotation import (down_rotation_factors, residual_rotation, rotate_globals, rotate_layer,
                                  rotate_value_path)
from atomq.config import FP16, CalibConfig, preset
from atomq.model.args import ModelArgs
from atomq.model.loader import build_model, expected_tensors, load_model, load_tensors
from atomq.model.source import WeightSource

CALIB = dict(n_samples=4, seq_len=32, dtype="float32")


def _logits(path, ids, **kw):
    return load_model(str(path), torch.float32, **kw).model(ids)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("mixtral", False)])
def test_rotated_float_model_gives_the_same_logits(tiny_model, tmp_path, arch, tied):
    path = tiny_model(arch, tie_word_embeddings=tied)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(path, ids)
    # in fp32: the rotated tensors give the same function
    src = WeightSource(str(path))
    args = ModelArgs.from_hf(src.config)
    q, down = residual_rotation(args, 3), down_rotation_factors(args, 3)
    embed = src.get("model.embed_tokens.weight")
    tensors = rotate_globals(embed, src.get("model.norm.weight"), embed if tied else src.get("lm_head.weight"), q)
    config = src.config
    config.tie_word_embeddings = False
    model = build_model(config, dataclasses.replace(FP16, rotate=True))
    for i in range(args.n_layers):
        raw = {n: src.get(f"model.layers.{i}.{n}") for n in _layer_names(model)}
        tensors.update({f"model.layers.{i}.{k}": v for k, v in rotate_layer(raw, args, q, down).items()})
    got = load_tensors(model, tensors, torch.float32)(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # through the pipeline and a checkpoint (16-bit storage of the rotated weights)
    out = tmp_path / "rotated"
    quantize_model(str(path), str(out), dataclasses.replace(FP16, rotate=True, rotate_seed=3), CalibConfig(**CALIB),
                   progress=False)
    stored = _logits(out, ids)
    assert ((stored - want).norm() / want.norm()).item() < 2e-3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # lm_head holds the folded final norm
    loaded = load_model(str(out), torch.bfloat16).model
    rot = loaded.model.layers[0].mlp.down_rotation if arch != "mixtral" else \
        loaded.model.layers[0].block_sparse_moe.experts[0].down_rotation
    assert rot.signs.dtype == torch.float32 and rot.small.dtype == torch.float32  # never cast to the model dtype


def test_rotation_spreads_outlier_channels(tiny_model):
    """The point of rotating: the embedding's largest channel energy shrinks towards the mean."""
    src = WeightSource(str(tiny_model("llama")))
    args = ModelArgs.from_hf(src.config)
    e = src.get("model.embed_tokens.weight").float()
    e[:, 7] *= 20  # one outlier channel
    q = residual_rotation(args, 0)
    ratio = lambda t: (t.pow(2).mean(0).max() / t.pow(2).mean()).item()  # noqa: E731
    assert ratio(e @ q) < 0.25 * ratio(e)
    torch.testing.assert_close(q @ q.t(), torch.eye(args.hidden_size), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["rot-w4a4", "rot-outliers", "rot-atom"])
def test_rotation_presets_quantize_load_and_run(tiny_model, calib_file, tmp_path, name):
    """Each rotation recipe quantizes, loads and runs. Without INT8 outlier channels (rot-w4a4) the
    rotation is what keeps per-channel / per-token W4A4 usable on a model with outlier channels: its
    logits are closer to the float model's than without it. With outliers the INT8 channels already
    absorb this toy model's outliers (measured: the rotation then loses a little here), so there the
    test only asks for a sane result; real-model accuracy is in BENCHMARKS.md."""
    src = tiny_model("llama", tie_word_embeddings=True)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    want = _logits(src, ids)
    err = {}
    for rotate in (True, False):
        out = tmp_path / f"{name}-{rotate}"
        quantize_model(str(src), str(out), preset(name, rotate=rotate), CalibConfig(dataset=str(calib_file), **CALIB),
                       progress=False)
        loaded = load_model(str(out), torch.float32)
        assert loaded.qcfg.rotate == rotate
        logits = loaded.model(ids)
        assert torch.isfinite(logits).all()
        err[rotate] = ((logits - want).norm() / want.norm()).item()
        mlp = loaded.model.model.layers[0].mlp
        assert mlp.down_proj.spec.own_index == (rotate and loaded.qcfg.reorder)  # gathers after the rotation
    assert err[True] < 0.8, err
    if name == "rot-w4a4":
        assert err[True] < 0.85 * err[False], err


def test_unrotatable_shapes_fail_before_anything_is_written(tiny_model, tmp_path):
    src = tiny_model("llama", hidden_size=72, num_attention_heads=6)  # head_dim 12: no Hadamard of that size
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        quantize_model(str(src), str(out), preset("rot-w4a4", gptq=False), CalibConfig(**CALIB), progress=False)
    assert not out.exists()


def test_rotate_and_smooth_are_exclusive():
    with pytest.raises(ValueError, match="rotate and smooth_alpha"):
        preset("rot-w4a4", smooth_alpha=0.5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_value_path_rotation_keeps_the_float_function(tiny_model, tmp_path, arch):
    """v_rotate alone: v_proj's heads rotated (bias too on Qwen2), o_proj undoing it; the INT4 cache then
    quantizes rotated values."""
    path = tiny_model(arch)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(path, ids)
    src = WeightSource(str(path))
    args = ModelArgs.from_hf(src.config)
    model = build_model(src.config, FP16)
    names = [n for n in expected_tensors(model) if not n.startswith("model.layers.")]
    tensors = {n: src.get(n) for n in names}
    for i in range(args.n_layers):
        raw = {n: src.get(f"model.layers.{i}.{n}") for n in _layer_names(model)}
        rotated = rotate_value_path(raw, args)
        assert not torch.allclose(rotated["self_attn.v_proj.weight"], raw["self_attn.v_proj.weight"].float())
        tensors.update({f"model.layers.{i}.{k}": v for k, v in rotated.items()})
    torch.testing.assert_close(load_tensors(model, tensors, torch.float32)(ids), want, rtol=1e-4, atol=1e-4)
    # through the pipeline: a checkpoint (16-bit storage) as close as the unrotated one
    err = {}
    for v_rotate in (False, True):
        out = tmp_path / f"v-rotate-{v_rotate}"
        quantize_model(str(path), str(out), dataclasses.replace(FP16, v_rotate=v_rotate), CalibConfig(**CALIB),
                       progress=False)
        assert load_model(str(out)).qcfg.v_rotate == v_rotate
        err[v_rotate] = ((_logits(out, ids) - want).norm() / want.norm()).item()
    assert err[True] < 1.5 * err[False] + 1e-4, err
    with pytest.raises(ValueError, match="already rotates the value path"):
        preset("rot-atom", v_rotate=True)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_down_input_rotation_keeps_the_float_function(tiny_model, tmp_path, arch):
    """down_rotate alone: R folded into down_proj's columns, applied online to SiLU(gate) * up."""
    path = tiny_model(arch)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(path, ids)
    err = {}
    for down_rotate in (False, True):  # a checkpoint (16-bit storage) as close as the unrotated one
        out = tmp_path / f"down-rotate-{down_rotate}"
        quantize_model(str(path), str(out), dataclasses.replace(FP16, down_rotate=down_rotate, rotate_seed=2),
                       CalibConfig(**CALIB), progress=False)
        loaded = load_model(str(out))
        assert loaded.qcfg.rotates_down == down_rotate and not loaded.qcfg.rotate
        layer = loaded.model.model.layers[0]
        mlp = layer.block_sparse_moe.experts[0] if arch == "mixtral" else layer.mlp
        assert (mlp.down_rotation is not None) == down_rotate
        err[down_rotate] = ((loaded.model(ids) - want).norm() / want.norm()).item()
    assert err[True] < 1.5 * err[False] + 1e-4, err
    with pytest.raises(ValueError, match="already rotates the down_proj input"):
        preset("rot-atom", down_rotate=True)


def test_partial_rotations_on_atom_quantize_load_and_run(tiny_model, calib_file, tmp_path):
    """Atom with the value path and the down input rotated: down gathers its input after the rotation,
    and the checkpoint runs close to the float model."""
    src = tiny_model("llama")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    want = _logits(src, ids)
    out = tmp_path / "atom-vd"
    quantize_model(str(src), str(out), preset("atom", v_rotate=True, down_rotate=True),
                   CalibConfig(dataset=str(calib_file), **CALIB), progress=False)
    loaded = load_model(str(out), torch.float32)
    mlp = loaded.model.model.layers[0].mlp
    assert mlp.down_rotation is not None and mlp.down_proj.spec.own_index
    logits = loaded.model(ids)
    assert torch.isfinite(logits).all() and ((logits - want).norm() / want.norm()).item() < 0.8
