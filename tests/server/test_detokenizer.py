"""Detokenizer on the byte tokenizer: its text, token by token or many at once, is what Python's incremental UTF-8
decoder (errors="replace") gives for the same bytes, with characters split across tokens, invalid bytes and
specials."""
import codecs
import random

from model.tokenizer import ByteTokenizer
from server.detokenizer import Detokenizer


def test_byte_level_text_is_the_incremental_decoders():
    tok = ByteTokenizer()
    rng = random.Random(0)
    for _ in range(500):
        ids = list("héllo wörld 🙂 ✓".encode())[:rng.randint(0, 30)]
        ids += [rng.choice([rng.randint(0, 127), rng.randint(128, 255), rng.randint(256, 259)])
                for _ in range(rng.randint(0, 30))]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        one_by_one, expected = Detokenizer(tok, ()), ""
        for token in ids:
            expected += decoder.decode(bytes([token]) if token < 256 else b"")
            one_by_one.add(token)
            assert one_by_one.text == expected
        half, k = Detokenizer(tok, ()), len(ids) // 2
        for token in ids[:k]:
            half.add(token)
        assert half.add_many(ids[k:]) == expected
