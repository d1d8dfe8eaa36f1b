"""``random:SHAPE:CONFIG`` model specs: parsed into the throughput benchmark's configurations, built in
their stored format with their linear method and KV-cache dtype, bad specs refused with the choices."""

from __future__ import annotations

import pytest

from atomq.model.random_weights import CONFIGS
from atomq.model_spec import open_llm, parse_random_spec
from atomq.model.random_weights import ByteTokenizer

SMALL = dict(device="cpu", kv_cache_bytes=1 << 22, max_model_len=64, max_num_seqs=4)


def test_parse():
    spec = parse_random_spec("random:llama-2-7b:atom")
    assert (spec.shape, spec.config) == ("llama-2-7b", CONFIGS["atom"]) and spec.name == "random:llama-2-7b:atom"
    assert parse_random_spec("smollm2") is None and parse_random_spec("runs/random") is None


@pytest.mark.parametrize("spec, match", [
    ("random:llama-2-7b", "random:SHAPE:CONFIG"),
    ("random:llama-2-7b:atom:x", "random:SHAPE:CONFIG"),
    ("random::atom", "random:SHAPE:CONFIG"),
    ("random:llama-3-8b:atom", r"unknown random model shape 'llama-3-8b'.*tiny-llama"),
    ("random:tiny-llama:int3", r"unknown configuration 'int3'.*fp16, fp8, w4a16, atom, rot-outliers"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_random_spec(spec)
    with pytest.raises(ValueError, match=match):
        open_llm(spec, **SMALL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_configuration_is_built_as_the_throughput_bench_runs_it(name):
    config = CONFIGS[name]
    llm = open_llm(f"random:tiny-llama:{name}", **SMALL)
    eng = llm.engine
    assert eng.lm.meta == {"random": "tiny-llama", "format": config.weights}
    assert (eng.config.linear_method, eng.config.kv_cache_dtype) == (config.linear_method, config.kv_cache_dtype)
    assert eng.lm.model.linear_method["method"] == config.linear_method
    assert eng.kv_pool.mode == config.kv_cache_dtype
    assert eng.lm.model.model.embed_tokens.weight.dtype.is_floating_point
    assert isinstance(llm.tokenizer, ByteTokenizer)
    [out] = llm.generate("hi", None)
    assert len(out.token_ids) > 0


def test_fp8_converts_float_weights():
    eng = open_llm("random:tiny-llama:fp8", **SMALL).engine
    assert eng.lm.model.linear_method["kernels"].get("fp8", 0) > 0


def test_contradicting_engine_options_are_refused():
    with pytest.raises(ValueError, match="kv cache dtype 'int4'; 'fp16' contradicts it"):
        open_llm("random:tiny-llama:atom", kv_cache_dtype="fp16", **SMALL)
    with pytest.raises(ValueError, match="linear method 'fp8'; 'int8' contradicts it"):
        open_llm("random:tiny-llama:fp8", linear_method="int8", **SMALL)
    with pytest.raises(ValueError, match="KV numerics from the configuration"):
        open_llm("random:tiny-llama:atom", kv_bits=8, **SMALL)
    with pytest.raises(ValueError, match="max_num_seqs"):  # engine knobs checked before the build
        open_llm("random:tiny-llama:atom", device="cpu", max_num_seqs=0)
    # the configuration's own value, given explicitly, is fine
    assert open_llm("random:tiny-llama:atom", kv_cache_dtype="int4", **SMALL).engine.kv_pool.mode == "int4"


def test_byte_tokenizer_gives_text_for_every_token():
    tok = ByteTokenizer()
    assert tok.decode(tok("héllo")["input_ids"]) == "héllo"
    assert tok("a", add_special_tokens=False) == {"input_ids": [97]}
    text = tok.decode([300, 31999, 256])
    assert len(text) == 3 and text.isprintable() and " " not in text


def test_generate_command_line(capsys):
    from atomq.cli import main

    rc = main(["generate", "--model", "random:tiny-llama:w4a16", "--prompt", "hi", "--max-tokens", "4",
               "--device", "cpu", "--kv-cache-bytes", str(1 << 22), "--max-model-len", "64"])
    assert rc == 0 and "(4 tokens, length)" in capsys.readouterr().out
    assert main(["generate", "--model", "random:tiny-llama:nope", "--prompt", "hi"]) == 2
    assert "unknown configuration 'nope'" in capsys.readouterr().err


def test_bench_serving_refuses_a_bad_spec_before_launching(tmp_path, capsys):
    from atomq.cli import main

    assert main(["bench", "serving", "--model", "random:tiny-llama:int3", "--out", str(tmp_path / "r.json")]) == 2
    assert "unknown configuration 'int3'" in capsys.readouterr().err
