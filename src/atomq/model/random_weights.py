"""Models of real shapes with random weights, in any linear method: for speed measurements only.

Time does not depend on the values, so benchmarks of Llama-2-7B / 13B / 70B or Mixtral-8x7B build the
model directly on the device, one tensor at a time (a 70B model in 4 bits never exists in 16 bits), with
values of realistic magnitude (activations stay finite through every layer). Nothing here needs
transformers: the shapes are plain numbers and the tokenizer is ``ByteTokenizer``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ..config import PRESETS, QuantConfig
from .llama import CausalLM
from .loader import LoadedModel, build_model, expected_tensors
from .specs import layer_specs

# name -> Hugging Face config fields (published model shapes)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096),
    "llama-2-13b": dict(architectures=["LlamaForCausalLM"], hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096),
    "llama-2-70b": dict(architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                        max_position_embeddings=4096),
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
                         rope_theta=1e6),
    # for tests: every code path of the big ones at a size the CPU runs in milliseconds
    "tiny-llama": dict(architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                       max_position_embeddings=1024),
    "tiny-mixtral": dict(architectures=["MixtralForCausalLM"], hidden_size=256, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=1024, num_local_experts=4, num_experts_per_tok=2),
}

# stored formats a random model can be built in; "fp8" is a run-time method over float weights
# (model/methods.py), so it is built as "float" and converted there
# formats whose KV cache is INT4 unless told otherwise
KV4_FORMATS = ("atom", "rot-outliers", "atomq-plus", "atom-a8", "atom-levels", "atomq-plus-levels")
RANDOM_FORMATS: dict[str, QuantConfig] = {
    "float": PRESETS["fp16"],
    "atom": dataclasses.replace(PRESETS["atom"], kv_bits=4),
    # group-free W4A4 (one scale per row and per token) + 128 INT8 outliers, rotated: the online
    # down_proj rotation runs, the offline ones are invisible in random weights
    "rot-outliers": dataclasses.replace(PRESETS["rot-outliers"], kv_bits=4),
    # Atom with groups of 32 and rotated keys: the format of the most accurate preset
    "atomq-plus": dataclasses.replace(PRESETS["atomq-plus"], kv_bits=4),
    # Atom's format with 8-bit activations (W4A8 on the same kernels)
    "atom-a8": dataclasses.replace(PRESETS["atom"], a_bits=8, a_clip=1.0, kv_bits=4),
    # group scales as integer multiples of one per row / token: the GEMMs accumulate K in int32
    "atom-levels": dataclasses.replace(PRESETS["atom"], kv_bits=4, w_scale_levels=15, a_scale_levels=15),
    "atomq-plus-levels": dataclasses.replace(PRESETS["atomq-plus"], kv_bits=4, w_scale_levels=15, a_scale_levels=15),
    "int8": PRESETS["w8a8"],
    "w4a16": PRESETS["w4a16"],
}


def shape_config(shape: str) -> SimpleNamespace:
    """A config object with the Hugging Face field names of ``shape`` (no transformers needed)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {sorted(SHAPES)}")
    fields = dict(rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, model_type="llama")
    fields.update(SHAPES[shape])
    return SimpleNamespace(**fields)


class ByteTokenizer:
    """Bytes as token ids; an id >= 256 decodes to one printable ASCII character (33 + id % 94), so that
    nearly every generated token adds text and a server streams it at once, as with a real tokenizer
    (time to first token is the first streamed chunk). Enough for the engine's detokenizer and stop
    strings on random models, at almost no host cost. No EOS, so requests run to max_tokens."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i if i < 256 else 33 + i % 94 for i in ids).decode("utf-8", errors="replace")


def random_model(shape: str, fmt: str = "float", dtype: torch.dtype = torch.float16, device="cpu",
                 seed: int = 0, kv_bits: int | None = None,
                 prepare_layer: Callable[[CausalLM, int], None] | None = None) -> LoadedModel:
    """A CausalLM of a named real shape (``SHAPES``) with random weights stored as ``fmt`` (``RANDOM_FORMATS``).

    The tensors are made on ``device`` one at a time, decoder layer by decoder layer; ``prepare_layer(model,
    i)``, when given, runs once layer i's tensors are in the model and before layer i + 1's are made (so a
    build that converts float weights, e.g. to FP8, holds one layer of them at a time). ``kv_bits`` sets the
    model's KV numerics (the engine's kv_cache_dtype "auto" follows it); the ``KV4_FORMATS`` default to 4.
    Returns a LoadedModel with a ByteTokenizer; ``meta`` records {"random": shape, "format": fmt}.
    """
    if fmt not in RANDOM_FORMATS:
        raise ValueError(f"unknown random-weight format {fmt!r}; choose one of {sorted(RANDOM_FORMATS)}")
    qcfg = RANDOM_FORMATS[fmt]
    if kv_bits is not None or fmt not in KV4_FORMATS:
        qcfg = dataclasses.replace(qcfg, kv_bits=kv_bits)
    config = shape_config(shape)
    from .args import ModelArgs

    args = ModelArgs.from_hf(config)
    specs = layer_specs(args, qcfg)
    model = build_model(config, qcfg, dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed) if torch.device(device).type == "cuda" else gen
    int8_rows = {f"model.layers.{i}.{n}": spec.w_bits == 8 for i in range(args.n_layers) for n, spec in specs.items()}
    state: dict[str, torch.Tensor] = {}
    layer = None  # the decoder layer whose tensors are being made

    def flush() -> None:  # the tensors made so far go into the model; a finished layer gets prepared
        model.load_state_dict(state, strict=False, assign=True)
        state.clear()
        if layer is not None and prepare_layer is not None:
            prepare_layer(model, layer)

    for name, (shp, exact) in expected_tensors(model).items():  # decoder layers come in order
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if i != layer:
            flush()
            layer = i
        state[name] = _random_value(name, shp, exact or dtype, device, dev_gen, gen, int8_rows)
    flush()
    if args.tie_embeddings:
        model.load_state_dict({"lm_head.weight": model.model.embed_tokens.weight}, strict=False, assign=True)
    missing = [n for n, t in model.state_dict().items() if t.is_meta and torch.device(device).type != "meta"]
    if missing:
        raise RuntimeError(f"random_model left tensors unset: {missing[:4]}")
    model = model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, ByteTokenizer(), qcfg, {"random": shape, "format": fmt})


def _random_value(name: str, shape: tuple[int, ...], dtype: torch.dtype, device, dev_gen: torch.Generator,
                  cpu_gen: torch.Generator, int8_rows: dict[str, bool]) -> torch.Tensor:
    """Values of the right kind and magnitude for tensor ``name`` (linear weights ~ N(0, 0.02) dequantized)."""
    owner, leaf = name.rsplit(".", 1)
    empty = lambda dt: torch.empty(shape, dtype=dt, device=device)  # noqa: E731
    if leaf == "signs":  # online rotation: random signs, the small factor the identity
        return (torch.randint(0, 2, shape, generator=cpu_gen) * 2 - 1).to(dtype).to(device)
    if leaf == "small":
        return torch.eye(shape[0], dtype=dtype, device=device)
    if leaf == "reorder_index":
        return torch.randperm(shape[0], generator=cpu_gen).to(torch.int32).to(device)
    if leaf == "zeros":  # asymmetric 4-bit zero points
        return empty(torch.int16).random_(0, 16, generator=dev_gen).to(torch.uint8)
    if leaf in ("qweight", "qweight_outlier"):
        if dtype == torch.uint8:  # packed INT4 pairs (or asymmetric 8-bit)
            return empty(torch.int16).random_(0, 256, generator=dev_gen).to(torch.uint8)
        return empty(torch.int16).random_(-127, 128, generator=dev_gen).to(torch.int8)
    if leaf == "scales_outlier" or (leaf == "scales" and int8_rows.get(owner)):
        return torch.full(shape, 0.02 / 73.0, dtype=dtype, device=device)  # int8 values: std ~73
    if leaf == "scales":
        return torch.full(shape, 0.02 / 4.6, dtype=dtype, device=device)  # int4 values: std ~4.6
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    if "norm" in owner:
        return torch.ones(shape, dtype=dtype, device=device)
    return empty(dtype).normal_(0.0, 0.02, generator=dev_gen)


# ------------------------------------------------------------- serving configurations of random models
@dataclass(frozen=True)
class Config:
    """One engine configuration. weights: the format random_model stores ("float", "w4a16", "atom");
    linear_method: the engine's run-time method (model/methods.py); kv_cache_dtype: the paged cache's."""

    name: str
    label: str
    weights: str
    linear_method: str
    kv_cache_dtype: str

    @property
    def engine_kwargs(self) -> dict[str, str]:
        """The EngineConfig fields this configuration sets (every engine over its model gets them)."""
        return {"linear_method": self.linear_method, "kv_cache_dtype": self.kv_cache_dtype}


CONFIGS: dict[str, Config] = {c.name: c for c in (
    Config("fp16", "FP16 weights, FP16 KV", "float", "auto", "fp16"),
    Config("fp8", "FP8 W8A8, FP8 KV", "float", "fp8", "fp8"),
    Config("w4a16", "W4A16, FP16 KV", "w4a16", "auto", "fp16"),
    Config("atom", "Atom W4A4, INT4 KV", "atom", "auto", "int4"),
    Config("rot-outliers", "group-free W4A4 + outliers (rotated), INT4 KV", "rot-outliers", "auto", "int4"),
    Config("atomq-plus", "Atom W4A4, groups of 32, rotated INT4 keys", "atomq-plus", "auto", "int4"),
    Config("atom-a8", "Atom W4A8 (8-bit activations, same kernels), INT4 KV", "atom-a8", "auto", "int4"),
    Config("atom-levels", "Atom W4A4, integer-multiplier group scales, INT4 KV", "atom-levels", "auto", "int4"),
    Config("atomq-plus-levels", "atomq-plus with integer-multiplier group scales", "atomq-plus-levels", "auto",
           "int4"),
)}


def build_random(shape: str, config: Config, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                 linear_backend: str = "auto") -> Any:
    """The LoadedModel of ``shape`` (random_weights.SHAPES) with random weights in config's stored format,
    its linears already prepared for config's method (so its weight bytes are those that run). Serve it
    with ``LLM(lm, linear_method=config.linear_method, kv_cache_dtype=config.kv_cache_dtype)``."""
    from .methods import apply_linear_method, prepare_linears

    convert = None
    if config.linear_method != "auto":  # fp8 / int8 from float weights: convert each layer as it is made
        def convert(model, i):
            apply_linear_method(model, config.linear_method, linear_backend, layers=[model.model.layers[i]])
    lm = random_model(shape, config.weights, dtype, device, seed=seed, prepare_layer=convert)
    prepare_linears(lm.model, config.linear_method, linear_backend)  # counts and marks the converted layers
    return lm
