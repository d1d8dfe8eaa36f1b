"""The command line end to end on a tiny model, and its errors on bad input."""

import json

import pytest

from atomq.cli import main

CALIB = ["--n-samples", "4", "--seq-len", "32", "--dtype", "float32"]


def test_quantize_inspect_and_eval(tiny_model, calib_file, eval_file, tmp_path, capsys):
    model, out = str(tiny_model("qwen2")), str(tmp_path / "ckpt")
    assert main(["quantize", "--model", model, "--out", out, "--dataset", str(calib_file), *CALIB,
                 "--group-size", "32", "--kv-bits", "none"]) == 0
    meta = json.loads((tmp_path / "ckpt" / "atomq_config.json").read_text())
    assert meta["quant"]["group_size"] == 32 and meta["quant"]["kv_bits"] is None  # flags override the preset
    assert main(["inspect", out]) == 0
    assert "qweight_outlier" in capsys.readouterr().out
    results = tmp_path / "ppl.jsonl"
    for m in (model, out):
        assert main(["eval", "ppl", "--model", m, "--dataset", str(eval_file), "--seq-len", "64",
                     "--limit", "2", "--dtype", "float32", "--json", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["windows"] for r in rows] == [2, 2]
    fp, q = rows[0]["ppl"], rows[1]["ppl"]
    assert 1.0 < fp < float("inf") and 1.0 < q < float("inf") and q != fp


@pytest.mark.parametrize("argv, message", [
    (["eval", "ppl", "--model", "/nonexistent/model"], "model path does not exist"),
    (["quantize", "--model", "{model}", "--out", "{out}", "--dataset", "/no/such.txt", *CALIB], "dataset file does not exist"),
    (["quantize", "--model", "{model}", "--out", "{out}", "--group-size", "48"], "group_size must be a power of two"),
    (["quantize", "--model", "{model}", "--out", "{out}", "--w-clip", "1.5"], "w_clip must be in"),
    (["eval", "ppl", "--model", "{model}", "--dataset", "{calib}", "--seq-len", "100000"], "fewer than one window"),
    (["eval", "ppl", "--model", "{model}", "--dataset", "{calib}", "--limit", "0"], "--limit must be >= 1"),
    (["quantize", "--model", "{model}", "--out", "{out}", "--device", "tpu", *CALIB], "unknown device 'tpu'"),
    (["quantize", "--model", "{model}", "--out", "{out}", "--device", "{no_gpu}", *CALIB], "{no_gpu_message}"),
    (["eval", "ppl", "--model", "{model}", "--device", "{no_gpu}"], "{no_gpu_message}"),
    (["eval", "zeroshot", "--model", "{model}", "--tasks", "piqa", "--device", "{no_gpu}"], "{no_gpu_message}"),
])
def test_bad_input_gives_a_clear_error(tiny_model, calib_file, tmp_path, capsys, argv, message):
    import torch

    # a GPU this machine lacks: CUDA itself where there is none, else one past the last
    no_gpu = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    fill = {"model": str(tiny_model("llama")), "out": str(tmp_path / "out"), "calib": str(calib_file),
            "no_gpu": no_gpu,
            "no_gpu_message": "CUDA GPU(s) here" if torch.cuda.is_available() else "torch sees no CUDA GPU"}
    assert main([a.format(**fill) for a in argv]) == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_calibrating_on_a_test_split_is_refused(tiny_model, tmp_path, capsys):
    test_file = tmp_path / "wikitext2" / "wiki.test.jsonl"
    test_file.parent.mkdir()
    test_file.write_text('{"text": "never calibrate on me"}\n')
    assert main(["quantize", "--model", str(tiny_model("llama")), "--out", str(tmp_path / "o"),
                 "--dataset", str(test_file), *CALIB]) == 2
    assert "test split" in capsys.readouterr().err
