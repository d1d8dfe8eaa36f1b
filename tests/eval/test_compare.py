"""The recipe comparison driver: the commands it runs (device, reuse of a calibration across KV precisions)
and its table, with the commands themselves faked (they are tested end to end in test_cli.py)."""

import json
import os

from atomq.eval import compare as C


def test_commands_reuse_calibrations_and_pass_the_device(tmp_path, monkeypatch):
    ran = []

    def fake_run(cmd):
        ran.append(cmd)
        if cmd[0] == "quantize":
            out = cmd[cmd.index("--out") + 1]
            os.makedirs(out)
            with open(os.path.join(out, "atomq_config.json"), "w") as f:
                json.dump({"calibration": {"peak_rss_mb": 100}}, f)
        else:
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                f.write(json.dumps({"ppl": 10.0 + len(ran), "windows": 1, "tokens": 10}) + "\n")
        return 1.0

    monkeypatch.setattr(C, "_run", fake_run)
    rows = C.compare("tiny", ["fp16", "atom", "atom-gptq"], str(tmp_path), 2, ["--n-samples", "4"], device="cuda")
    quantize = [c for c in ran if c[0] == "quantize"]
    evals = [c for c in ran if c[0] == "eval"]
    assert len(quantize) == 1 and "--n-samples" in quantize[0]  # atom-gptq = atom with a 16-bit KV cache
    assert all(c[c.index("--device") + 1] == "cuda" for c in ran)
    assert evals[2][evals[2].index("--model") + 1] == str(tmp_path / "atom") and "none" in evals[2]
    assert [r["preset"] for r in rows] == ["fp16", "atom", "atom-gptq"]
    assert "| atom | 13.000 | 1.182x |" in C.table(rows)  # ppl 10 + commands run so far


def test_an_unusable_device_is_refused_before_any_command(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setattr(C, "_run", lambda cmd: pytest.fail(f"ran {cmd}"))
    with pytest.raises(ValueError, match="unknown device"):
        C.main(["--presets", "atom", "--out", str(tmp_path), "--device", "tpu"])
    assert not any(tmp_path.iterdir())
