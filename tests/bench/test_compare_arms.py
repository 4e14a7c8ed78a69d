"""bench/compare_arms.py: the k = 0 arm's width matches the k = 16 arms' parameters, and --tiny runs every arm x seed
as child processes on the CPU (train, then stream over the held-out split and third-party code) and reports each
arm with three seeds and finite bits per byte. The GPU run is the lead's (bench/RESULTS.md)."""
import json
import math

from tests.bench.bench_module import load_bench


def test_k0_arm_is_parameter_matched_at_the_default_sizes():
    compare_arms = load_bench("compare_arms")
    args = compare_arms.parse_args([])
    arms = compare_arms.build_arms(args)
    assert [a.name for a in arms] == ["k0-matched", "k16-none", "k16-learned", "k16-learned-imf0"]
    k0, k16 = arms[0], arms[1]
    assert k16.num_params == 3_262_944 and (k0.n_concepts, k0.n_layers) == (0, 6) and k0.d_model > 256
    assert abs(k0.num_params / k16.num_params - 1) <= 0.03
    assert arms[3].imf_weight == 0 and arms[2].imf_weight > 0 and arms[2].concept_decay == "learned"


def test_tiny_run_reports_every_arm_with_three_seeds(tmp_path, capsys):
    compare_arms = load_bench("compare_arms")
    out = tmp_path / "out"
    result = compare_arms.main(["--tiny", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    # three files: what comes back from a device run is a few files, the models stay in the work directory
    assert sorted(p.name for p in out.iterdir()) == ["compare_arms.json", "compare_arms.md", "logs.txt"]
    assert (tmp_path / "work" / "k0-matched-s2" / "model.safetensors").is_file()
    saved = json.loads((out / "compare_arms.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    names = [a["name"] for a in saved["arms"]]
    assert len(names) == 4 and names[0] == "k0-matched"
    for name in names:
        row = saved["summary"][name]
        assert sorted(row["seeds"]) == [0, 1, 2] and row["steps"] == [3] and not row["stopped_early"]
        for group in ("held_out_clean", "third_party"):
            assert row[group]["bpb"]["n"] == 3 and math.isfinite(row[group]["bpb"]["mean"])
            assert all(math.isfinite(b["mean"]) for b in row[group]["by_position"])
    # token-matched: the arms of one seed read the same documents in the same order
    tokens = {name: {r["seed"]: r["train"]["tokens_seen"] for r in saved["runs"][name]} for name in names}
    assert all(t == tokens[names[0]] for t in tokens.values())
    assert saved["third_party"] and all(s["license"] and s["files"] for s in saved["third_party"])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(tuple(f"| {n} | " for n in names))]
    assert len(rows) == 3 * 4 and "| arm | params | seeds | held-out clean bpb | third-party bpb |" in printed
    assert all(" | 3 | " in row for row in rows[:4])
    assert "\n".join(saved["table"]) in (out / "compare_arms.md").read_text()
