"""What a ``--model`` string names, and the LLM built from it (``atomq generate`` and ``atomq serve``).

Either something model/loader.load_model opens (an atomq checkpoint, an HF directory, a .gguf file,
'smollm2'), or ``random:SHAPE:CONFIG``: random weights of a real shape (model/random_weights.SHAPES, e.g.
llama-2-7b, tiny-llama) in one of the serving configurations of random models (model/random_weights.CONFIGS:
fp16, fp8, w4a16, atom, rot-outliers, atomq-plus, atom-a8), built and served exactly as the throughput benchmark does: the configuration's
stored format, its linear method and its KV-cache dtype, and a ByteTokenizer. For speed measurements only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class RandomSpec:
    """A parsed ``random:SHAPE:CONFIG``. config: a model/random_weights.Config."""

    shape: str
    config: Any

    @property
    def name(self) -> str:
        return f"{RANDOM_PREFIX}{self.shape}:{self.config.name}"


def parse_random_spec(model: str) -> RandomSpec | None:
    """The RandomSpec of a ``random:SHAPE:CONFIG`` string, None for anything else (a path, a name);
    ValueError naming the known shapes / configurations when SHAPE or CONFIG is not one of them."""
    if not isinstance(model, str) or not model.startswith(RANDOM_PREFIX):
        return None
    from .model.random_weights import CONFIGS, SHAPES

    parts = model[len(RANDOM_PREFIX):].split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a random model is 'random:SHAPE:CONFIG' (e.g. random:llama-2-7b:atom), got {model!r}; "
                         f"shapes: {', '.join(SHAPES)}; configurations: {', '.join(CONFIGS)}")
    shape, config = parts
    if shape not in SHAPES:
        raise ValueError(f"unknown random model shape {shape!r} in {model!r}; choose one of {', '.join(SHAPES)}")
    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r} in {model!r}; choose one of {', '.join(CONFIGS)}")
    return RandomSpec(shape, CONFIGS[config])


def random_engine_kwargs(spec: RandomSpec, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """engine_kwargs with the configuration's linear_method and kv_cache_dtype; a different explicit
    value (not "auto") is a ValueError rather than silently measuring another configuration."""
    out = dict(engine_kwargs)
    for key, value in spec.config.engine_kwargs.items():
        given = out.get(key, "auto")
        if given not in ("auto", value):
            raise ValueError(f"{spec.name} runs {key.replace('_', ' ')} {value!r}; {given!r} contradicts it "
                             f"(pick another configuration instead)")
        out[key] = value
    return out


def open_llm(model: Any, *, dtype: str = "auto", device: str | None = None, seed: int = 0,
             **llm_kwargs: Any) -> Any:
    """``atomq.LLM`` over ``model``: a random spec is built here (seed: its weights), anything else goes
    to LLM as it is. dtype / device as for LLM ("auto": float16 on CUDA, float32 on CPU); llm_kwargs:
    EngineConfig fields (and, for loaded models only, LLM's kv_bits / kv_rotate)."""
    import torch

    from .engine.llm import LLM, EngineConfig

    spec = parse_random_spec(model)
    if spec is None:
        return LLM(model, dtype=dtype, device=device, **llm_kwargs)
    from .model.loader import DTYPES
    from .model.random_weights import build_random

    fixed = [k for k in ("kv_bits", "kv_rotate") if k in llm_kwargs]
    if fixed:
        raise ValueError(f"{spec.name} takes its KV numerics from the configuration; drop {', '.join(fixed)}")
    engine_kwargs = random_engine_kwargs(spec, llm_kwargs)
    EngineConfig(**engine_kwargs)  # bad knobs fail before the (slow) build
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "float16" if torch.device(device).type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    lm = build_random(spec.shape, spec.config, DTYPES[dtype], device, seed,
                      engine_kwargs.get("linear_backend", "auto"))
    return LLM(lm, **engine_kwargs)
