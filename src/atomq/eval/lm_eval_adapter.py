"""An atomq model as an lm-evaluation-harness ``LM`` (needs the optional extra: ``pip install -e ".[eval]"``).

    import lm_eval
    from atomq.eval.lm_eval_adapter import AtomqLM

    lm_eval.simple_evaluate(model=AtomqLM("runs/smollm2-atom", dtype="bfloat16"), tasks=["piqa"])

Importing this module also registers the model under the name ``atomq`` (``--model atomq --model_args
pretrained=PATH`` once imported). Log-likelihoods come from ``zeroshot.loglikelihoods``, the engine behind
``atomq eval zeroshot``, so both paths score a request identically. Generation is not supported yet.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..model.loader import DTYPES, load_model
from .zeroshot import LogLik, encode_pair, loglikelihoods, model_max_length


@register_model("atomq")
class AtomqLM(LM):
    """lm-eval model over an atomq ``CausalLM`` (checkpoint, HF directory, .gguf or 'smollm2').

    ``loaded``: an already loaded ``LoadedModel`` (then ``pretrained``, ``dtype`` and ``kv_bits`` are unused).
    """

    def __init__(self, pretrained: str = "smollm2", dtype: str = "bfloat16", batch_size: int | str = 16,
                 kv_bits: int | str = "checkpoint", device: str = "cpu", max_length: int | None = None,
                 loaded=None):
        super().__init__()
        if loaded is None:
            kv = kv_bits if kv_bits in ("checkpoint", "none") else int(kv_bits)
            loaded = load_model(pretrained, DTYPES[dtype], device=device, kv_bits=kv)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length else model_max_length(self.model) or 2048

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and every rolling window's first prediction) conditions on."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[LogLik]:
        return loglikelihoods(self.model, pairs, self.batch_size, self.max_length, progress=not disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: Instances with args (context, continuation) -> [(sum log p, is_greedy)]."""
        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in (r.args for r in requests)]
        return [tuple(r) for r in self._score(pairs, disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """requests: Instances with args (text,) -> log p(text | prefix token), in windows of max_length."""
        out = []
        for req in tqdm(requests, desc="rolling loglikelihood", disable=disable_tqdm):
            ids = self.tokenizer.encode(req.args[0], add_special_tokens=False)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, self.prefix_token_id, self.max_length, context_len=1)]  # (context ids, predicted ids)
            out.append(sum(r.logprob for r in self._score(windows, disable_tqdm=True)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("atomq models have no generation loop yet: use log-likelihood tasks")

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
