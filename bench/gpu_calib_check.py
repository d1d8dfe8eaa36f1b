"""Calibration on a CUDA GPU at a real model size: write a random Hugging Face model of a named shape
(model/random_weights.SHAPES; time does not depend on the values), calibrate it with a recipe on the GPU,
and report the wall time, the per-layer time and the peak memory. Needs torch, transformers, safetensors,
tokenizers and the C4 calibration sample (``--data-dir``).

    PYTHONPATH=src python bench/gpu_calib_check.py --shape llama-2-7b --data-dir .gpu/data --out calib.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch


def write_random_model(path: Path, shape: str, layers: int | None, device: str, seed: int = 0) -> dict:
    """A safetensors HF directory of ``shape`` with random bf16 weights (one shard per layer) and a small
    byte-level BPE tokenizer; returns the config fields."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from atomq.model.random_weights import SHAPES

    fields = dict(SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")
    if layers:
        fields["num_hidden_layers"] = layers
    arch = fields.pop("architectures")
    model_type = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral"}[arch[0]]
    config = AutoConfig.for_model(model_type, architectures=arch, **fields)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    def norm():  # near 1 with a few large channels, so the reorder has outliers to find
        w = torch.ones(h)
        w[torch.randperm(h, generator=torch.Generator().manual_seed(seed))[:16]] = 20.0
        return w.to(torch.bfloat16)

    weight_map = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("globals.safetensors", {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": norm(),
                                  "lm_head.weight": rand(v, h)})
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
             p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
             p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm()}
        if model_type == "mixtral":
            t[p + "block_sparse_moe.gate.weight"] = rand(config.num_local_experts, h)
            for e in range(config.num_local_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                t.update({q + "w1.weight": rand(f, h), q + "w3.weight": rand(f, h), q + "w2.weight": rand(h, f)})
        else:
            t.update({p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                      p + "mlp.down_proj.weight": rand(h, f)})
        shard(f"layer-{i:03d}.safetensors", t)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _write_tokenizer(path)
    return config.to_dict()


def _write_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer of 320 ids trained on random words (its ids are valid for any vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = "the of and a to in is was for on as with by he at from his it an were are which".split()
    text = [" ".join(rng.choice(words) for _ in range(2000)) for _ in range(4)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)


def main() -> int:
    from atomq.calib.pipeline import quantize_model
    from atomq.config import CalibConfig, preset

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's)")
    ap.add_argument("--presets", default="atom", help="comma-separated recipes to calibrate")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--data-dir", required=True, help="offline data directory holding c4/")
    ap.add_argument("--device", default="cuda", help="where to calibrate (cpu: a smoke run of small shapes)")
    ap.add_argument("--out", default="calib_check.json")
    ns = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if ns.device != 'cpu' else 'cpu'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        config = write_random_model(Path(tmp) / "model", ns.shape, ns.layers or None, ns.device)
        print(f"wrote the random {ns.shape} ({config['num_hidden_layers']} layers) in {time.time() - t0:.0f} s",
              flush=True)
        for name in ns.presets.split(","):
            ccfg = CalibConfig(n_samples=ns.n_samples, seq_len=ns.seq_len, device=ns.device)
            meta = quantize_model(str(Path(tmp) / "model"), str(Path(tmp) / name), preset(name), ccfg,
                                  data_dir=ns.data_dir, progress=False)
            cal = meta["calibration"]
            rows.append({"shape": ns.shape, "layers": config["num_hidden_layers"], "preset": name,
                         "windows": ns.n_samples, "seq_len": ns.seq_len, "seconds": cal["seconds"],
                         "s_per_layer": round(cal["seconds"] / config["num_hidden_layers"], 2),
                         "peak_gpu_mb": cal.get("peak_gpu_mb"), "peak_rss_mb": cal["peak_rss_mb"],
                         "gpu": cal.get("gpu", "cpu")})
            print(json.dumps(rows[-1]), flush=True)
    Path(ns.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print("\n| shape | layers | preset | windows x tokens | seconds | s / layer | peak GPU MB |")
    print("|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['layers']} | {r['preset']} | {r['windows']} x {r['seq_len']} | {r['seconds']} "
              f"| {r['s_per_layer']} | {r['peak_gpu_mb']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
