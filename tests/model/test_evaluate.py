"""Streamed evaluation: whole documents through the serving path's state, bits per byte by position."""
import math

import torch
import torch.nn.functional as F

from helpers import make_model, one_thread
from model.training.evaluate import read_documents, stream_bpb


def one_pass_nats(model, doc, window=None):
    """Sum of next-token cross-entropy over `doc`, in one pass from an empty state (or per window of inputs)."""
    window = window or doc.numel()
    total = 0.0
    with torch.no_grad():
        for lo in range(0, doc.numel() - 1, window):
            inputs, targets = doc[lo:lo + window][:doc.numel() - 1 - lo], doc[lo + 1:lo + 1 + window]
            out, _ = model(inputs[None])
            total += float(F.cross_entropy(out.head, targets, reduction="sum"))
    return total


def test_streamed_bpb_by_position_equals_one_pass_per_document():
    with one_thread():
        check_streamed_bpb()


def check_streamed_bpb():
    model = make_model(0, concept_decay="learned")
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 50, (n,), generator=gen) for n in (100, 10, 300)]
    report = stream_bpb(model, docs, chunk_len=32, batch_size=2, buckets=(0, 64, 256))
    assert report["tokens"] == 99 + 9 + 299
    assert [(b["start"], b["end"], b["tokens"]) for b in report["by_position"]] == [
        (0, 64, 63 + 9 + 63), (64, 256, 36 + 192), (256, None, 44)]
    expected = [one_pass_nats(model, doc) for doc in docs]
    bits = sum(expected) / report["tokens"] / math.log(2)
    assert abs(report["bpb"] - bits) < 1e-5
    for row, nats, doc in zip(report["documents"], expected, docs):
        assert row["tokens"] == doc.numel() - 1
        assert abs(row["bpb"] - nats / (doc.numel() - 1) / math.log(2)) < 1e-5
    weighted = sum(b["bpb"] * b["tokens"] for b in report["by_position"]) / report["tokens"]
    assert abs(weighted - report["bpb"]) < 1e-6

    windowed = stream_bpb(model, docs, chunk_len=16, batch_size=2, reset_every=64, buckets=(0, 64, 256))
    expected = sum(one_pass_nats(model, doc, window=64) for doc in docs)
    assert abs(windowed["bpb"] - expected / windowed["tokens"] / math.log(2)) < 1e-5
    assert abs(windowed["bpb"] - report["bpb"]) > 1e-4  # the carried state changes the predictions


def test_read_documents(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_bytes(b"xy")
    (tmp_path / "a.py").write_bytes(b"abc")
    docs, names = read_documents([str(tmp_path)])
    assert [d.tolist() for d in docs] == [[97, 98, 99, 257], [120, 121, 257]]
    assert names == [str(tmp_path / "a.py"), str(tmp_path / "pkg" / "b.py")]


def test_held_out_files_that_repeat_training_lines_are_told_apart(tmp_path):
    from model.training.near_duplicates import line_overlap, split_near_duplicates

    table = "".join(f"    '\\x{i:02x}'     #  0x{i:02X} -> CHARACTER NUMBER {i}\n" for i in range(40))
    (tmp_path / "cp1.py").write_text("# codec one\n" + table)
    (tmp_path / "cp2.py").write_text("# codec two, nearly the same table\n" + table.replace("NUMBER 3", "NUMBER 9"))
    (tmp_path / "code.py").write_text("def totally_new_function(argument):\n    return argument * 2 + 1\n"
                                      "import os  # short lines are not counted\n")
    (tmp_path / "empty.py").write_text("")
    overlap = line_overlap(tmp_path, ["cp1.py"], ["cp2.py", "code.py", "empty.py"])
    assert overlap["cp2.py"] > 0.7 and overlap["code.py"] == 0.0 and overlap["empty.py"] == 0.0
    assert split_near_duplicates(overlap) == (["code.py", "empty.py"], ["cp2.py"])
