"""A tiny CPU training run end to end, the corpus split, and the IMF redundancy penalty."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import make_model
from model.tokenizer import ByteTokenizer
from model.train_forward import train_forward
from model.training.corpus import IGNORE_INDEX, DocumentStreams, is_held_out, load_corpus, split_documents
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


@pytest.mark.parametrize("extra", [[], ["--stateful", "--concept-decay", "learned", "--stream-eval"]])
def test_tiny_training_run(tmp_path, extra):
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    main(["--out", str(out), "--corpus-root", str(tmp_path / "corpus"), "--d-model", "16", "--n-layers", "2",
          "--n-concepts", "3", "--d-state", "4", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
          "--eval-every", "2", "--eval-windows", "2", "--final-eval-windows", "2", "--warmup-steps", "1",
          "--device", "cpu", *extra])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and math.isfinite(metrics["held_out_bpb"])
    assert metrics["stateful"] == bool(extra) and metrics["concept_decay"] == ("learned" if extra else "none")
    if extra:  # the held-out file streamed whole and in windows: the same tokens, scored differently
        streamed = metrics["held_out_streamed"]
        assert streamed["streamed"]["tokens"] == streamed["windows"]["tokens"] > 0
        assert streamed["streamed"]["bpb"] != streamed["windows"]["bpb"]
    assert all(math.isfinite(h["train_ce"]) for h in metrics["history"])
    model = load_model(out)
    assert model.config.n_concepts == 3 and (out / "README.md").is_file()
    logits, _ = model(torch.tensor([[100, 101, 102]]))
    assert torch.isfinite(logits.head).all()


def test_stop_after_minutes_ends_a_fixed_step_run_and_says_so(tmp_path):
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    main(["--out", str(out), "--corpus-root", str(tmp_path / "corpus"), "--d-model", "16", "--n-layers", "1",
          "--n-concepts", "2", "--d-state", "4", "--steps", "50", "--batch-size", "2", "--seq-len", "32",
          "--final-eval-windows", "2", "--stop-after-minutes", "0", "--device", "cpu"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 0 and metrics["stopped_early"] is True


def test_documents_stream_whole_in_consecutive_windows():
    eos = ByteTokenizer.eos_id
    docs = [torch.tensor([1, 2, 3, 4, 5, 6, 7, eos]), torch.tensor([8, 9, eos]), torch.tensor([10, 11, 12, 13, eos])]
    assert [d.tolist() for d in split_documents(torch.cat(docs))] == [d.tolist() for d in docs]
    empty_file = torch.tensor([eos])
    assert len(split_documents(torch.cat([docs[0], empty_file]))) == 1
    assert len(split_documents(torch.cat([docs[0], empty_file]), min_tokens=1)) == 2
    streams = DocumentStreams(split_documents(torch.cat(docs)), batch=2, length=3,
                              generator=torch.Generator().manual_seed(0))
    seen = {0: [], 1: []}  # per lane: (fresh, inputs, targets) of real positions
    starts = []  # first token of each document begun, in the order the lanes took them
    for _ in range(6):
        w = streams.next_windows()
        for lane in range(2):
            real = w.targets[lane] != IGNORE_INDEX
            assert bool(real[0]) and (w.inputs[lane][~real] == ByteTokenizer.pad_id).all()  # padding at the end only
            seen[lane].append((bool(w.fresh[lane]), w.inputs[lane][real].tolist(), w.targets[lane][real].tolist()))
            if w.fresh[lane]:
                starts.append(int(w.inputs[lane, 0]))
    # every lane reads documents whole and in order: fresh at a document's start, then consecutive windows
    for lane, windows in seen.items():
        stream = []
        for fresh, inputs, targets in windows:
            if fresh:
                stream.append([inputs[0]])
            assert inputs[1:] == targets[:-1] and stream[-1][-1] == inputs[0]
            stream[-1].extend(targets)
        assert all(any(doc.tolist() == s for doc in docs) for s in stream), (lane, stream)
    assert sorted(starts[:3]) == [1, 8, 10] and len(starts) > 3  # each pass covers every document once


def test_carried_state_is_used_and_gradients_stop_at_the_window():
    # Window 2 continues window 1's state: its loss differs from window 2 alone, and (truncated BPTT) its gradient
    # reaches nothing of window 1: embedding rows of tokens only window 1 saw stay zero (the head is untied).
    model = make_model(0, concept_decay="learned", tie_embeddings=False).train()
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, 25, (2, 40), generator=gen)  # tokens 0..24 only in window 1
    second = torch.randint(25, 50, (2, 41), generator=gen)

    def window_two_loss(state):
        out = train_forward(model, second[:, :-1], state)
        return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), second[:, 1:].reshape(-1))

    carried = train_forward(model, first, model.empty_state(2)).state
    assert not any(t.requires_grad for t in carried.tensors().values())
    assert carried.steps.tolist() == [40, 40] and bool((carried.concept_mass > 0).all())
    model.zero_grad()
    loss = window_two_loss(carried)
    loss.backward()
    assert float(model.embedding.weight.grad[:25].abs().max()) == 0.0
    assert float(model.embedding.weight.grad[25:].abs().max()) > 0.0
    with torch.no_grad():
        empty = window_two_loss(model.empty_state(2))
        concepts_reset = carried.clone()
        concepts_reset.concept_mean.zero_()
        concepts_reset.concept_mass.zero_()
        without_concepts = window_two_loss(concepts_reset)
    assert abs(float(loss.detach()) - float(empty)) > 1e-4
    assert abs(float(loss.detach()) - float(without_concepts)) > 1e-5  # the carried concept state itself matters
