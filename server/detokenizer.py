"""Incremental detokenizing with stop strings: shared by the frontends (every request's text) and the engine (a
session generate must end its state exactly at a stop string)."""
from __future__ import annotations

import codecs


class Detokenizer:
    """Incremental text for generated ids, holding back text that may still turn into a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        self.num_emitted = 0
        self._ids: list[int] = []
        self._is_bytes = _is_byte_level(tokenizer)
        self._partial = b""  # byte-level: the start of a character whose other bytes are still to come

    def add(self, token_id: int) -> bool:
        """Append one token; True when a stop string completed (the text is cut before it)."""
        if self.tokenizer is None:
            return False
        if self._is_bytes:
            if 0 <= token_id < 128 and not self._partial:  # the common case, once per token: no decoder call
                self.text += _ASCII[token_id]
            else:
                self.text += self._decode(_BYTE[token_id] if 0 <= token_id < 256 else b"")
        else:
            self._ids.append(token_id)
            self.text = self.tokenizer.decode(self._ids)
        for s in self.stop:
            # only the tail can hold a new match: the text before it was checked already
            at = self.text.find(s, max(0, self.num_emitted - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    def add_many(self, token_ids: list[int]) -> str:
        """The text of many tokens at once, as adding them one by one gives when no stop string is set."""
        if self.tokenizer is not None:
            if self._is_bytes:
                self.text += self._decode(self.tokenizer.decode_bytes(token_ids))
            else:
                self._ids += token_ids
                self.text = self.tokenizer.decode(self._ids)
        return self.text

    def _decode(self, data: bytes) -> str:
        """UTF-8 text of bytes that follow those seen, as an incremental decoder (errors="replace") gives it."""
        data = self._partial + data
        text, used = codecs.utf_8_decode(data, "replace", False)
        self._partial = data[used:]
        return text

    def delta(self, is_final: bool) -> str:
        """Text not yet handed out that no stop string can still claim."""
        end = len(self.text)
        if not is_final:
            for s in self.stop:  # hold back a tail that may still grow into a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
            end = max(end, self.num_emitted)
        out = self.text[self.num_emitted:end]
        self.num_emitted = end
        return out


_ASCII = [chr(i) for i in range(128)]
_BYTE = [bytes([i]) for i in range(256)]  # a byte-level id's byte (the ids after 256 are specials, without text)


def _is_byte_level(tokenizer) -> bool:
    return tokenizer is not None and hasattr(tokenizer, "decode_bytes") and type(tokenizer).__name__ == "ByteTokenizer"
