"""The in-context tasks' data (every answer where it is due, and only there) and a tiny run of the three-arm
comparison on the CPU: parameter-matched arms, accuracy through the serving forward, servable model directories."""
import json

import pytest
import torch

from model.training import train_tasks
from model.training.corpus import IGNORE_INDEX
from model.training.tasks import MqarTask, SparseParityTask
from model.weights import load_model


def test_mqar_answers_each_query_with_the_value_its_key_was_paired_with():
    task = MqarTask(num_pairs=6, num_queries=4, num_keys=10, num_values=7)
    batch = task.sample(32, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (32, 16) and task.vocab_size == 17
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
        keys, values = inputs[0:12:2], inputs[1:12:2]
        assert len(set(keys)) == 6 and all(k < 10 for k in keys) and all(10 <= v < 17 for v in values)
        assert targets[:12] == [IGNORE_INDEX] * 12
        assert len(set(inputs[12:])) == 4  # distinct queries, each one of the keys
        assert targets[12:] == [values[keys.index(q)] for q in inputs[12:]]
    assert torch.equal(batch.scored, batch.targets != IGNORE_INDEX)


def test_sparse_parity_labels_are_the_xor_of_one_secret_pair_per_sequence():
    task = SparseParityTask(num_bits=5, sparsity=2, num_examples=12, scored_from=6)
    batch = task.sample(16, torch.Generator().manual_seed(1))
    examples = batch.inputs.view(16, 12, 6)
    bits, labels = examples[..., :5], examples[..., 5] - 2
    assert bits.max() <= 1 and set(labels.unique().tolist()) <= {0, 1}
    for b in range(16):  # exactly one pair of positions explains every label of the sequence
        pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)
                 if torch.equal((bits[b, :, i] + bits[b, :, j]) % 2, labels[b])]
        assert len(pairs) >= 1
    targets = batch.targets.view(16, 12, 6)
    assert torch.equal(targets[..., 4], labels + 2) and (targets[..., [0, 1, 2, 3, 5]] == IGNORE_INDEX).all()
    scored = batch.scored.view(16, 12, 6)
    assert scored[:, 6:, 4].all() and scored.sum() == 16 * 6


@pytest.mark.parametrize("fields, message", [(dict(num_pairs=9, num_keys=8), "num_pairs"),
                                             (dict(num_pairs=4, num_queries=5), "num_queries")])
def test_impossible_mqar_sizes_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        MqarTask(**fields)


def test_a_tiny_three_arm_run_trains_matched_models_and_saves_servable_directories(tmp_path):
    rows = train_tasks.main(["--task", "mqar", "--out", str(tmp_path), "--steps", "2", "--d-model", "16",
                             "--n-layers", "2", "--pairs", "3", "--queries", "2", "--keys", "6", "--values", "6",
                             "--batch-size", "4", "--eval-batches", "1", "--heads", "2", "--device", "cpu"])
    assert [r["arm"] for r in rows] == ["infomamba", "mamba", "hybrid"]
    budget = rows[0]["num_params"]
    assert all(abs(r["num_params"] - budget) <= 0.25 * budget for r in rows), [r["num_params"] for r in rows]
    assert all(0 <= r["accuracy"] <= 1 and r["steps"] == 2 for r in rows)
    hybrid = load_model(tmp_path / "mqar-hybrid")
    assert hybrid.config.layer_types == ("infomamba", "attention") and hybrid.config.n_concepts == 0
    assert hybrid.config.layers[1].attention_window == 8  # the whole task sequence
    assert json.loads((tmp_path / "mqar-hybrid" / "metrics.json").read_text())["accuracy"] == rows[2]["accuracy"]
    table = (tmp_path / "mqar-results.md").read_text()
    assert table.count("\n| mqar |") == 3 and "attention+infomamba" in table
