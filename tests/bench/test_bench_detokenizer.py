"""bench_detokenizer's two ways give the same text, and its table has a row per stream length."""
import sys

from tests.bench.bench_module import load_bench


def test_both_ways_give_the_whole_decode_and_a_row_per_length(monkeypatch, capsys):
    bench = load_bench("bench_detokenizer")
    monkeypatch.setattr(sys, "argv", ["bench_detokenizer.py", "--tokens", "40", "120"])
    bench.main()  # asserts both texts equal the whole decode at each length
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40 |")
            or line.startswith("| 120 |")]
    assert len(rows) == 2
