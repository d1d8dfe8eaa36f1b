"""Accuracy evaluation: perplexity and zero-shot, on local data files."""
