"""Accuracy evaluation: perplexity and zero-shot, on local data files."""

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live (inputs go there); CPU for a model without parameters."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
