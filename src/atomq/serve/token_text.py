"""Each vocabulary entry's exact bytes and display text, for log-probabilities.

Decoding one token id at a time loses bytes: a token holding part of a multi-byte character decodes to
U+FFFD. OpenAI's ``bytes`` field exists for exactly those tokens, so the bytes come from the vocabulary
piece itself: byte-level BPE pieces (GPT-2, Llama-3, Qwen2, SmolLM2) map each character back to one byte
through GPT-2's reversible byte-to-character table; SentencePiece pieces map ``<0xNN>`` to that byte and
``▁`` to a space. Special and added tokens are their own text. Anything else falls back to decoding the
id alone. Results are cached per id (the engine thread builds this once per server).
"""

from __future__ import annotations

from typing import Any


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's table, inverted: printable character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # bytes with no printable stand-in get the code points from 256 on, in order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """token id -> (text, bytes): ``bytes`` exact, ``text`` its UTF-8 decoding (U+FFFD where incomplete)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._byte_level = _byte_level_decoder()
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", 0) or 0
        sample = [p for p in self._pieces(range(min(size, 2000))) if p]
        self._mode = ("byte-level" if sample and all(all(c in self._byte_level for c in p) for p in sample)
                      else "sentencepiece" if any(p.startswith("▁") for p in sample) else "decode")

    def _pieces(self, ids: Any) -> list[str | None]:
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        return [None] * len(ids) if convert is None else list(convert(list(ids)))

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return hit

    def join(self, token_ids: list[int]) -> str:
        """The exact text of a token sequence: its tokens' bytes joined, then decoded (U+FFFD only where
        the bytes are not UTF-8)."""
        return b"".join(self(t)[1] for t in token_ids).decode("utf-8", errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        piece = None if self._mode == "decode" else self._pieces([token_id])[0]
        if piece is None or token_id in self._special:
            return (piece if piece is not None else self.tokenizer.decode([token_id])).encode("utf-8")
        if self._mode == "byte-level" and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        if self._mode == "sentencepiece":
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("▁", " ").encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")
