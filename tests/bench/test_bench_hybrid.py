"""bench/bench_hybrid.py runs at toy sizes on the CPU (--tiny) and prints both tables in full; the GPU run is the
lead's (README, bench/RESULTS.md)."""
from tests.bench.bench_module import load_bench


def test_bench_hybrid_runs_at_tiny_sizes_and_prints_every_row(capsys):
    lines = load_bench("bench_hybrid").main(["--tiny"])
    models = [line for line in lines if line.startswith(("| pure", "| hybrid"))]
    assert len(models) == 2 and all(line.count("|") == 8 for line in models)
    windows = [line for line in lines if line.startswith(("| 8 |", "| 32 |"))]
    assert len(windows) == 2 and "n/a" not in "".join(windows)
    state = [int(line.split("|")[2].replace(",", "")) for line in windows]
    assert state[1] - state[0] == 2 * 24 * 2 * (32 // 4) * 4  # the ring grows by (32 - 8) positions of K and V
    assert "| model | params |" in capsys.readouterr().out
