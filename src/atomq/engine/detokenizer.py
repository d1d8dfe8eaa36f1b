"""Incremental detokenization: text grows token by token without re-decoding the whole output.

Byte-level BPE tokens can end inside a UTF-8 character, and some tokenizers drop a leading space when a
token is decoded alone. So each step decodes a short window: the tokens from ``prefix_offset`` (a few
already-emitted tokens of context) to the end, minus the text of the same window without the new
tokens. A delta ending in U+FFFD (an incomplete character) is held back until later tokens complete it.

Decoding is lazy: ``push`` only records a token; the text catches up (one window decode over every
pending token) when ``text`` is read or ``step`` asks for the delta. Requests without stop strings are
read once at the end (offline) or once per step by a streaming reader, so nobody pays two tokenizer
calls per token per step for text nobody reads.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 5  # tokens of already-decoded context in each window


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_token_ids)
        self.prefix_offset = max(len(self.ids) - _CONTEXT, 0)
        self.read_offset = len(self.ids)
        self._text = ""  # output text decoded so far (prompt excluded)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    @property
    def text(self) -> str:
        """The output text so far (pending tokens decoded first)."""
        self._catch_up()
        return self._text

    @text.setter
    def text(self, value: str) -> None:  # a stop string cuts the text
        self._catch_up()
        self._text = value

    def push(self, token_id: int) -> None:
        """Add one generated token without decoding it yet."""
        self.ids.append(token_id)

    def step(self, token_id: int) -> str:
        """Add one generated token; return the new text (possibly '' while a character is incomplete)."""
        self.ids.append(token_id)
        return self._catch_up()

    def _catch_up(self) -> str:
        """Decode the tokens after read_offset; returns the new text ('' while a character is incomplete)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end: emit text held back for an incomplete character (as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self._text += delta
        return delta


def find_stop(text: str, stops: tuple[str, ...], new_chars: int) -> int | None:
    """Index where the earliest stop string starts in ``text`` if one ends within its last
    ``new_chars`` characters (so each step only searches the tail); None otherwise."""
    best = None
    for s in stops:
        start = max(0, len(text) - new_chars - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
