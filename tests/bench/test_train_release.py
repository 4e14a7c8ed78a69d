"""bench/train_release.py --tiny: both candidates train and are streamed as child processes on the CPU, the winner
is the lower clean held-out bpb (a tie ships k = 0), and --out holds the winner's model directory, flat, with a card
naming both candidates, and a release.json of finite numbers. The GPU run is the lead's."""
import json
import math

from model.weights import load_model
from tests.bench.bench_module import load_bench


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_tiny_release_ships_the_winner_with_its_card(tmp_path):
    train_release = load_bench("train_release")
    out = tmp_path / "out"
    release = train_release.main(["--tiny", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert sorted(p.name for p in out.iterdir()) == sorted(train_release.OUT_FILES)
    assert len(train_release.OUT_FILES) <= 8  # what a device run brings back

    names = ["k0-matched", "k4-learned"]
    winner = release["winner"]
    assert release["candidate_names"] == names and winner in names
    saved = json.loads((out / "release.json").read_text())
    assert saved["winner"] == winner and sorted(saved["candidates"]) == names
    scores = saved["decision"]["scores"]
    assert sorted(scores) == names and all(finite(v) for v in scores.values())
    assert winner == min(scores, key=scores.get) or saved["decision"]["tie"]
    for name, c in saved["candidates"].items():
        evals = c["record"]["eval"]
        for group in ("held_out_clean", "held_out_clean_windows", "third_party", "third_party_windows"):
            assert finite(evals[group]["bpb"]) and all(finite(b["bpb"]) for b in evals[group]["by_position"])
        assert c["record"]["train"]["steps"] == 3 and not c["record"]["train"]["stopped_early"]
        checks = saved["checks"][name]
        assert isinstance(checks["third_party_streamed_beats_windows"], bool)
        assert finite(checks["by_group"]["third_party"]["streamed_minus_windows"])
    # same seed, same documents: the two candidates saw the same tokens
    assert len({c["record"]["train"]["tokens_seen"] for c in saved["candidates"].values()}) == 1

    model = load_model(out)  # the flat directory is a model directory
    assert model.config.name == "infomamba-pystdlib-byte"
    assert model.config.n_concepts == saved["candidates"][winner]["arm"]["n_concepts"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "infomamba-pystdlib-byte" and metrics["command"].startswith("python -m model.training")
    assert finite(metrics["eval"]["held_out_clean"]["bpb"])

    card = (out / "README.md").read_text()
    assert all(name in card for name in names) and f"**{winner}** (shipped)" in card
    assert f"{scores[winner]:.3f}" in card and "python bench/train_release.py --tiny" in card
    if winner == "k0-matched":
        assert "plain Mamba (k = 0)" in card
    assert len(saved["samples"]) == 3 and all(s["text"] in ("def ", "class ") or len(s["text"]) > 4
                                              for s in saved["samples"])


def test_a_tie_ships_k0_and_k_must_beat_it():
    train_release = load_bench("train_release")

    def records(k0, k4):
        return {"k0-matched": {"eval": {"held_out_clean": {"bpb": k0}}},
                "k4-learned": {"eval": {"held_out_clean": {"bpb": k4}}}}

    assert train_release.pick_winner(records(1.6, 1.6002), 0.0005)["winner"] == "k0-matched"
    tie = train_release.pick_winner(records(1.6002, 1.6), 0.0005)
    assert tie["winner"] == "k0-matched" and tie["tie"]
    won = train_release.pick_winner(records(1.605, 1.60), 0.0005)
    assert won["winner"] == "k4-learned" and not won["tie"] and won["within_seed_spread"]
    assert not train_release.pick_winner(records(1.63, 1.60), 0.0005)["within_seed_spread"]
    assert train_release.pick_winner(records(1.58, 1.60), 0.0005)["winner"] == "k0-matched"
