"""The on-disk checkpoint: bit-exact save/load, self-description, and clear errors on damaged input."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from atomq.calib.pipeline import quantize_model
from atomq.config import CalibConfig, preset
from atomq.model.checkpoint import CheckpointError
from atomq.model.inspect import describe
from atomq.model.loader import load_model

CALIB = dict(n_samples=4, seq_len=32, dtype="float32")


@pytest.fixture
def ckpt(tiny_model, calib_file, tmp_path):
    out = tmp_path / "ckpt"
    quantize_model(str(tiny_model("llama")), str(out), preset("atom"), CalibConfig(dataset=str(calib_file), **CALIB),
                   progress=False)
    return out


def test_files_and_config_describe_the_checkpoint(ckpt):
    names = set(os.listdir(ckpt))
    assert {"config.json", "atomq_config.json", "model.safetensors", "tokenizer.json"} <= names
    meta = json.loads((ckpt / "atomq_config.json").read_text())
    assert meta["format"] == "atomq" and meta["format_version"] == 1
    assert meta["quant"]["w_bits"] == 4 and meta["quant"]["kv_bits"] == 4
    assert meta["calibration"]["n_samples"] == 4 and meta["calibration"]["seconds"] >= 0
    assert meta["splits"]["mlp.down_proj"] == [160, 64, 32]  # intermediate 160: the rule of quant/layout.py
    tensors = load_file(ckpt / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    assert tensors["model.layers.0.input_layernorm.reorder_index"].dtype == torch.int32
    assert tensors["model.layers.0.self_attn.o_proj.reorder_index"].dtype == torch.int32
    assert "model.layers.0.mlp.down_proj.reorder_index" not in tensors  # folded into gate/up rows


def test_save_then_load_is_bit_exact(ckpt):
    saved = load_file(ckpt / "model.safetensors")
    model = load_model(str(ckpt), torch.float16).model
    state = model.state_dict()
    for name, t in saved.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name


def test_inspect_prints_config_and_tensors(ckpt):
    text = describe(str(ckpt))
    assert "w_bits = 4" in text and "model.layers.0.self_attn.q_proj.qweight" in text and "U8" in text


def test_missing_and_truncated_files_raise_clear_errors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(str(ckpt))
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(str(ckpt))


@pytest.mark.parametrize("damage, message", [
    ("shape", "shape"), ("dtype", "dtype"), ("drop", "missing tensors"), ("extra", "unexpected tensors"),
])
def test_wrong_tensors_are_reported(ckpt, damage, message):
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.self_attn.k_proj.scales"
    if damage == "shape":
        tensors[name] = torch.cat([tensors[name], tensors[name]], dim=1)
    elif damage == "dtype":
        tensors[name] = tensors[name].float()
    elif damage == "drop":
        del tensors[name]
    else:
        tensors["model.layers.1.mystery"] = torch.zeros(3)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=message):
        load_model(str(ckpt))


def test_bad_format_version_is_refused(ckpt):
    meta = json.loads((ckpt / "atomq_config.json").read_text())
    meta["format_version"] = 99
    (ckpt / "atomq_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        load_model(str(ckpt))


def test_existing_output_is_not_overwritten_and_failures_leave_nothing(ckpt, tiny_model, tmp_path):
    with pytest.raises(FileExistsError):
        quantize_model(str(tiny_model("llama")), str(ckpt), preset("atom"), CalibConfig(**CALIB), progress=False)
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError):
        quantize_model(str(tiny_model("llama")), str(out), preset("atom"),
                       CalibConfig(dataset=str(tmp_path / "nope.txt"), **CALIB), progress=False)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".never")]


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    d.mkdir()
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(d)
    save_file({"x": torch.zeros(1)}, d / "model.safetensors")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_model(str(d))


def test_kv_numerics_are_run_time_overrides(ckpt):
    stored = load_model(str(ckpt)).model.model.layers[0].self_attn
    assert stored.kv_bits == 4 and stored.kv_hadamard is None
    attn = load_model(str(ckpt), kv_bits="none", kv_rotate=True).model.model.layers[0].self_attn
    assert attn.kv_bits is None and attn.kv_hadamard is not None


def test_activation_clip_is_a_run_time_override(ckpt, tiny_model):
    q_proj = lambda lm: lm.model.model.layers[0].self_attn.q_proj  # noqa: E731
    assert q_proj(load_model(str(ckpt))).spec.a_clip == 0.9  # Atom's
    lm = load_model(str(ckpt), a_clip=0.8)
    assert q_proj(lm).spec.a_clip == 0.8 and lm.qcfg.a_clip == 0.8
    with pytest.raises(ValueError, match="a_clip must be in"):
        load_model(str(ckpt), a_clip=1.5)
    with pytest.raises(ValueError, match="activations are 16-bit"):
        load_model(str(ckpt), weights_only=True, a_clip=0.8)
    with pytest.raises(ValueError, match="not an atomq checkpoint"):
        load_model(str(tiny_model("llama")), a_clip=0.8)
