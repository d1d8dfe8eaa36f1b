"""Shared fixtures: tiny random Hugging Face models of each supported architecture, a tiny tokenizer and
a small calibration text, all made on the fly (no hub, no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "under silver moons and river stones carry old songs toward distant hills").split()


def random_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab <= 320) trained on random_text, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([random_text(2000, s) for s in range(4)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(random_text(6000, seed=7))
    return path


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    import json

    path.write_text("\n".join(json.dumps({"text": random_text(120, seed=100 + i)}) for i in range(20)) + "\n")
    return path


def hf_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    common = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    if arch == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**common, rope_parameters=rope, architectures=["LlamaForCausalLM"])
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=128, architectures=["MistralForCausalLM"])
    if arch == "qwen2":
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                             architectures=["MixtralForCausalLM"])
    raise ValueError(arch)


def make_tiny_model(path: Path, arch: str, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny HF model of ``arch`` (plus the tiny tokenizer) to ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = hf_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights and a few outlier channels, like real models
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
                p[:: 17] *= 8.0
            elif p.dim() == 3:  # fused MoE experts
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tmp_path, tokenizer_dir):
    """Factory: tiny_model(arch, **config_overrides) -> path of a saved HF model."""

    def make(arch: str = "llama", **overrides) -> Path:
        return make_tiny_model(tmp_path / f"hf-{arch}", arch, tokenizer_dir, **overrides)

    return make
