"""A generated stream's text from a tokenizer.json, per token: server/detokenizer.py's window against decoding
every id again at every token (what it did before), side by side on the CPU.

    python bench/bench_detokenizer.py [--tokens 500 4000]

The tokenizer is a byte-level BPE trained here on a small mixed-script corpus (no download); the stream is that
corpus encoded and repeated."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.tokenizer import HFTokenizer  # noqa: E402
from server.detokenizer import Detokenizer  # noqa: E402

CORPUS = ["the quick brown fox jumps over the lazy dog", "héllo wörld ünïcode ✓ €100", "def f(x):\n    return x",
          "emoji 🙂🙃 and CJK 漢字 かな", "numbers 0123456789 and symbols !?#%&"] * 20


def tokenizer(directory: Path) -> HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory / "tokenizer.json")


def whole_decodes(tok, ids: list[int]) -> str:
    """The text as it was built before: every id decoded again at every token."""
    text = ""
    for i in range(1, len(ids) + 1):
        text = tok.decode(ids[:i])
    return text


def windowed(tok, ids: list[int]) -> str:
    detok = Detokenizer(tok, ())
    for token in ids:
        detok.add(token)
        detok.delta(is_final=False)
    return detok.flush()


def best_us_a_token(fn, tok, ids, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(tok, ids)
        best = min(best, time.perf_counter() - t0)
    return best / len(ids) * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[500, 4000])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tok = tokenizer(Path(directory))
        stream = tok.encode(" ".join(CORPUS))
        print("| stream, tokens | whole decode a token, µs a token | window, µs a token | ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for n in args.tokens:
            ids = (stream * (n // len(stream) + 1))[:n]
            assert windowed(tok, ids) == whole_decodes(tok, ids) == tok.decode(ids)
            before, now = best_us_a_token(whole_decodes, tok, ids), best_us_a_token(windowed, tok, ids)
            print(f"| {n:,} | {before:,.1f} | {now:,.1f} | {before / now:,.0f}x |")


if __name__ == "__main__":
    main()
