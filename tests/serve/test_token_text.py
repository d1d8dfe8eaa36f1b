"""Log-probability token texts keep every byte: byte-level BPE and SentencePiece pieces, special tokens."""

from __future__ import annotations

from atomq.serve.token_text import TokenText


def test_byte_level_pieces_give_exact_bytes(tiny_lm):
    tok = tiny_lm.tokenizer
    text = TokenText(tok)
    ids = tok("caf\u00e9 \u4f60\u597d over", add_special_tokens=False)["input_ids"]
    raw = b"".join(text(i)[1] for i in ids)
    assert raw.decode("utf-8") == "caf\u00e9 \u4f60\u597d over"  # the bytes join up even where one token's text is U+FFFD
    assert text.join(ids) == "caf\u00e9 \u4f60\u597d over"
    assert all(text(i)[0] == text(i)[1].decode("utf-8", errors="replace") for i in ids)
    eos = tok.eos_token_id
    assert text(eos) == (tok.eos_token, tok.eos_token.encode())


class _SentencePiece:
    """The calls TokenText makes, on a SentencePiece-style vocabulary."""

    pieces = ["<unk>", "<s>", "</s>", "▁the", "<0xE4>", "<0xBD>", "<0xA0>", "ing"] + ["▁x"] * 10
    all_special_ids = [0, 1, 2]

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids):
        raise AssertionError("not needed for these pieces")


def test_sentencepiece_pieces_and_byte_fallback():
    text = TokenText(_SentencePiece())
    assert text(3) == (" the", b" the") and text(7) == ("ing", b"ing") and text(2) == ("</s>", b"</s>")
    assert b"".join(text(i)[1] for i in (4, 5, 6)).decode("utf-8") == "\u4f60"
    assert text(4)[0] == "\ufffd"


def test_a_tokenizer_without_a_vocabulary_decodes_each_id():
    from atomq.model.random_weights import ByteTokenizer

    text = TokenText(ByteTokenizer())
    assert text(104) == ("h", b"h") and text(300)[1] == ByteTokenizer().decode([300]).encode()
