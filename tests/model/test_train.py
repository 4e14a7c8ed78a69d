"""A tiny CPU training run end to end, the corpus split, and the IMF redundancy penalty."""
import json
import math

import torch

from model.training.corpus import is_held_out, load_corpus
from model.training.train import main, redundancy_penalty
from model.weights import load_model


def write_corpus(root, num_files=40):
    for i in range(num_files):
        path = root / f"pkg{i % 3}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    j = 0
    while not is_held_out(f"extra{j}.py"):  # make sure the held-out split is not empty
        j += 1
    (root / f"extra{j}.py").write_text("class Held:\n    pass\n" * 20)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "skipped.py").write_text("import this\n")


def test_corpus_split_is_by_path(tmp_path):
    write_corpus(tmp_path)
    corpus = load_corpus(tmp_path)
    files = corpus.train_files + corpus.held_out_files
    assert len(files) == 41 and corpus.held_out_files and not any("site-packages" in f for f in files)
    assert corpus.train_files == sorted(corpus.train_files)
    assert all(is_held_out(f) for f in corpus.held_out_files)
    sizes = sum((tmp_path / f).stat().st_size + 1 for f in corpus.train_files)
    assert corpus.train.numel() == sizes and int(corpus.train[-1]) == 257  # bytes + one eos per file


def test_redundancy_penalty_sees_correlation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 16, generator=gen)
    independent = redundancy_penalty([(x, torch.randn(8, 64, 16, generator=gen))], pool=4)
    same = redundancy_penalty([(x, x)], pool=4)
    assert float(same) > 5 * float(independent) > 0


def test_tiny_training_run(tmp_path):
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    main(["--out", str(out), "--corpus-root", str(tmp_path / "corpus"), "--d-model", "16", "--n-layers", "2",
          "--n-concepts", "3", "--d-state", "4", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
          "--eval-every", "2", "--eval-windows", "2", "--final-eval-windows", "2", "--warmup-steps", "1",
          "--device", "cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and math.isfinite(metrics["held_out_bpb"])
    assert all(math.isfinite(h["train_ce"]) for h in metrics["history"])
    model = load_model(out)
    assert model.config.n_concepts == 3 and (out / "README.md").is_file()
    logits, _ = model(torch.tensor([[100, 101, 102]]))
    assert torch.isfinite(logits.head).all()
