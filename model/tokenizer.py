"""Text <-> token ids: a built-in byte-level tokenizer, or a model directory's tokenizer.json."""
from __future__ import annotations

from pathlib import Path

BYTE_SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")


class ByteTokenizer:
    """256 byte ids, then the specials: the vocabulary of models trained here (vocab_size >= 260)."""

    vocab_size = 256 + len(BYTE_SPECIALS)
    bos_id, eos_id, pad_id, unk_id = 256, 257, 258, 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def token_bytes(self, token_id: int) -> bytes:
        """One token as logprobs show it: its byte, or a special's name."""
        if 0 <= token_id < 256:
            return bytes([token_id])
        return BYTE_SPECIALS[token_id - 256].encode() if token_id - 256 < len(BYTE_SPECIALS) else b""


class HFTokenizer:
    """A tokenizer.json read with the `tokenizers` library."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = next((self._tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>")
                            if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def token_bytes(self, token_id: int) -> bytes:
        """One token as logprobs show it (specials by name)."""
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def load_tokenizer(model_dir: str | Path | None, vocab_size: int | None):
    """The model's tokenizer.json if present, else the byte tokenizer for byte-level vocabularies, else None."""
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(Path(model_dir) / "tokenizer.json")
    if vocab_size is not None and vocab_size >= ByteTokenizer.vocab_size:
        return ByteTokenizer()
    return None
