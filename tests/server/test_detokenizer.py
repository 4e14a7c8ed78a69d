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


CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld ünïcode ✓ €100", "def f(x):\n    return x",
          "emoji 🙂🙃 and CJK 漢字 かな", "  spaces   and\ttabs  ", "numbers 0123456789 and symbols !?#%&"] * 20


def byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def metaspace_bpe():
    """SentencePiece's way: spaces as ▁, and a decoder that drops the first one of a decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    return tok


def as_hf(tok, tmp_path, name):
    from model.tokenizer import HFTokenizer

    path = tmp_path / f"{name}.json"
    tok.save(str(path))
    return HFTokenizer(path)


class CountingDecodes:
    """A tokenizer whose decode counts the ids it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.num_ids = tokenizer, 0

    def decode(self, ids):
        self.num_ids += len(ids)
        return self.tokenizer.decode(ids)


def test_tokenizer_json_text_grows_as_the_whole_decode_and_never_takes_back(tmp_path):
    rng = random.Random(1)
    for name, tok in (("byte-level", byte_level_bpe()), ("metaspace", metaspace_bpe())):
        hf = as_hf(tok, tmp_path, name)
        texts = [rng.choice(CORPUS)[rng.randint(0, 10):] + rng.choice(CORPUS) for _ in range(40)]
        id_lists = [hf.encode(t) for t in texts]
        id_lists += [[rng.randrange(hf.vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(200)]
        for ids in id_lists:
            whole = hf.decode(ids)
            detok, handed = Detokenizer(hf, ()), ""
            for token in ids:
                detok.add(token)
                handed += detok.delta(is_final=False)
                assert whole.startswith(handed), (name, ids)  # text handed out is never taken back
            handed += detok.delta(is_final=True)
            assert handed == detok.text == whole, (name, ids)
            many = Detokenizer(hf, ())
            many.add_many(ids[:len(ids) // 2])
            many.add_many(ids[len(ids) // 2:])
            assert many.flush() == whole


def test_tokenizer_json_costs_a_window_of_ids_a_token_not_all_of_them(tmp_path):
    hf = as_hf(byte_level_bpe(), tmp_path, "byte-level")
    ids = hf.encode(" ".join(CORPUS))[:3000]
    counting = CountingDecodes(hf)
    detok = Detokenizer(counting, ())
    for token in ids:
        detok.add(token)
    assert detok.flush() == hf.decode(ids)
    # every id goes through a few windows; decoding all of them at every token would be 4.5M
    assert counting.num_ids < 10 * len(ids), counting.num_ids


def test_a_stop_string_ends_the_text_and_nothing_is_flushed_after_it(tmp_path):
    hf = as_hf(byte_level_bpe(), tmp_path, "byte-level")
    ids = hf.encode("the quick brown fox jumps over the lazy dog")
    detok = Detokenizer(hf, ("fox",))
    stopped_at = next(i for i, token in enumerate(ids) if detok.add(token))
    assert stopped_at < len(ids) - 1
    assert detok.flush() == detok.text == "the quick brown "


def test_invalid_bytes_do_not_hold_the_text_or_grow_the_window(tmp_path):
    hf = as_hf(byte_level_bpe(), tmp_path, "byte-level")
    lone = next(i for i in range(hf.vocab_size) if hf.decode([i]) == "\ufffd")  # a byte no character starts with
    ids = [lone] * 500
    counting = CountingDecodes(hf)
    detok = Detokenizer(counting, ())
    for token in ids:
        detok.add(token)
    assert len(detok.text) >= len(ids) - 20  # handed on, not held for ever
    assert detok.flush() == hf.decode(ids)
    assert counting.num_ids < 50 * len(ids), counting.num_ids  # the window stays a few ids wide
