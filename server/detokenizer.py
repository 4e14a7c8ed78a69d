"""Incremental detokenizing with stop strings: shared by the frontends (every request's text) and the engine (a
session generate must end its state exactly at a stop string)."""
from __future__ import annotations

import codecs


class Detokenizer:
    """Incremental text for generated ids, holding back text that may still turn into a stop string.

    A tokenizer.json's text is decoded over a window of the last few ids, not over all of them: decoding every id
    again at every token cost a stream of n tokens n^2 / 2 ids. The window starts at the ids whose text came in
    before the last advance, so that a decoder that treats the first id of a decode apart (a SentencePiece space)
    treats both decodes alike, and the new text is the longer decode's tail. Text that ends in U+FFFD (a character
    whose other bytes are still to come) is held back until it completes; `flush` writes it as it stands."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        self.num_emitted = 0
        self._ids: list[int] = []
        self._is_bytes = _is_byte_level(tokenizer)
        self._partial = b""  # byte-level: the start of a character whose other bytes are still to come
        self._window = 0  # tokenizer.json: where the decode window starts in _ids
        self._read = 0  # and the ids before this one have their text in self.text
        self._holds = 0  # advances in a row that held the text back
        self.is_stopped = False

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
            self._advance(final=False)
        for s in self.stop:
            # only the tail can hold a new match: the text before it was checked already
            at = self.text.find(s, max(0, self.num_emitted - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                self.is_stopped = True
                return True
        return False

    def add_many(self, token_ids: list[int]) -> str:
        """The text of many tokens at once, as adding them one by one gives when no stop string is set."""
        if self.tokenizer is not None:
            if self._is_bytes:
                self.text += self._decode(self.tokenizer.decode_bytes(token_ids))
            else:
                self._ids += token_ids
                self._advance(final=False)
        return self.text

    def flush(self) -> str:
        """The whole text: what is held back as incomplete written as a whole decode writes it (U+FFFD). Nothing
        after a stop string."""
        if self.tokenizer is not None and not self.is_stopped:
            if self._is_bytes:
                if self._partial:
                    self.text += codecs.utf_8_decode(self._partial, "replace", True)[0]
                    self._partial = b""
            elif self._read < len(self._ids):
                self._advance(final=True)
        return self.text

    def _advance(self, final: bool) -> None:
        """tokenizer.json: the text of the ids past _read, unless it ends in an incomplete character (and not final)."""
        ids, start = self._ids, self._window
        known = self.tokenizer.decode(ids[start:self._read]) if self._read > start else ""
        text = self.tokenizer.decode(ids[start:])
        if len(text) > len(known) and (final or not text.endswith("\ufffd") or self._holds >= MAX_HELD):
            self.text += text[len(known):]
            self._window, self._read = self._read, len(ids)
            self._holds = 0
        else:
            self._holds += 1

    def _decode(self, data: bytes) -> str:
        """UTF-8 text of bytes that follow those seen, as an incremental decoder (errors="replace") gives it."""
        data = self._partial + data
        text, used = codecs.utf_8_decode(data, "replace", False)
        self._partial = data[used:]
        return text

    def delta(self, is_final: bool) -> str:
        """Text not yet handed out that no stop string can still claim; is_final: all of it (flushed)."""
        if is_final:
            self.flush()
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


# tokens a tokenizer.json's text waits at most for the rest of a character: a character is 4 bytes at most, so past
# this a trailing U+FFFD is an invalid sequence, not an unfinished one, and waiting longer would make the window,
# and each token's decode, grow without end
MAX_HELD = 8
_ASCII = [chr(i) for i in range(128)]
_BYTE = [bytes([i]) for i in range(256)]  # a byte-level id's byte (the ids after 256 are specials, without text)


def _is_byte_level(tokenizer) -> bool:
    return tokenizer is not None and hasattr(tokenizer, "decode_bytes") and type(tokenizer).__name__ == "ByteTokenizer"
