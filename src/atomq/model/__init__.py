"""Decoder forwards with Hugging Face names, their loader and the checkpoint format."""
