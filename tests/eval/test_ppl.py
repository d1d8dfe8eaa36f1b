import math

import torch

from atomq.eval.ppl import perplexity


class Uniform(torch.nn.Module):
    """Predicts every token with equal probability: perplexity == vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


class Oracle(torch.nn.Module):
    """Knows the next token of a fixed sequence with probability p."""

    def __init__(self, seq, vocab, p):
        super().__init__()
        self.seq, self.vocab, self.p = seq, vocab, p

    def forward(self, ids):
        t = ids.shape[1]
        probs = torch.full((1, t, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs[0, torch.arange(t - 1), self.seq[1:t]] = self.p
        return probs.log()


def test_uniform_model_has_vocabulary_perplexity():
    windows = torch.randint(0, 50, (3, 16))
    res = perplexity(Uniform(50), windows, progress=False)
    assert math.isclose(res.ppl, 50, rel_tol=1e-5) and res.windows == 3 and res.tokens == 3 * 15


def test_perplexity_is_exp_of_mean_nll_and_limit_applies():
    seq = torch.randint(0, 20, (32,))
    res = perplexity(Oracle(seq, 20, 0.5), seq.view(1, 32), progress=False)
    assert math.isclose(res.ppl, 2.0, rel_tol=1e-5)
    assert perplexity(Uniform(20), torch.zeros(5, 8, dtype=torch.long), limit=2, progress=False).windows == 2
