"""bench/bench_hybrid.py runs at toy sizes on the CPU (--tiny) and prints both tables in full; the GPU run is the
lead's (README, bench/RESULTS.md)."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_hybrid_runs_at_tiny_sizes_and_prints_every_row(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_hybrid
        lines = bench_hybrid.main(["--tiny"])
    finally:
        sys.path.remove(str(BENCH))
    models = [line for line in lines if line.startswith(("| pure", "| hybrid"))]
    assert len(models) == 2 and all(line.count("|") == 8 for line in models)
    windows = [line for line in lines if line.startswith(("| 8 |", "| 32 |"))]
    assert len(windows) == 2 and "n/a" not in "".join(windows)
    state = [int(line.split("|")[2].replace(",", "")) for line in windows]
    assert state[1] - state[0] == 2 * 24 * 2 * (32 // 4) * 4  # the ring grows by (32 - 8) positions of K and V
    assert "| model | params |" in capsys.readouterr().out
