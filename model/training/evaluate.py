"""Bits per byte the way a model is served: whole documents streamed through the state, by position in the document.

    python -m model.training.evaluate model/default_model [FILE_OR_DIR ...] [--reset-every 512] [--json out.json]

Each document (a file's bytes plus one end-of-file token) is fed from an empty state in consecutive chunks through
`InfoMamba.forward`, the serving path, with the state carried (DESIGN.md §1: evaluate a model the way it is served).
Token i + 1 is predicted from tokens 0..i; the first token of a document is not scored. `--reset-every 512` empties
the state every 512 tokens instead, which is the model card's windowed measurement. With no paths, the held-out
split of this interpreter's standard library (corpus.py) is evaluated, its near-duplicates of training files
(near_duplicates.py: half or more of their lines seen in training) reported apart.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from model.infomamba import InfoMamba
from model.tokenizer import ByteTokenizer
from model.training.corpus import list_files, load_corpus
from model.training.near_duplicates import NEAR_DUPLICATE_OVERLAP, line_overlap, split_near_duplicates
from model.weights import load_model

# Bucket i holds the tokens at positions [POSITION_BUCKETS[i], POSITION_BUCKETS[i + 1]); the last one is open.
POSITION_BUCKETS = (0, 512, 2048, 8192, 32768, 131072)


@dataclass
class _Tally:
    """Cross-entropy in nats and the number of scored tokens."""

    nats: float = 0.0
    tokens: int = 0

    def bits_per_token(self) -> float:
        return self.nats / max(self.tokens, 1) / math.log(2)


@dataclass
class _Lane:
    doc: int
    offset: int = 0  # next input position


@dataclass
class StreamEval:
    buckets: tuple[int, ...]
    total: _Tally = field(default_factory=_Tally)
    by_position: list[_Tally] = field(default_factory=list)
    by_document: list[_Tally] = field(default_factory=list)

    def add(self, doc: int, positions: torch.Tensor, nats: torch.Tensor) -> None:
        """positions (n,) of the predicted tokens in document `doc`, nats (n,) their cross-entropy."""
        bucket = torch.bucketize(positions, torch.tensor(self.buckets[1:]), right=True)  # (n,)
        for i in range(len(self.buckets)):
            picked = nats[bucket == i]
            self.by_position[i].nats += float(picked.sum())
            self.by_position[i].tokens += picked.numel()
        self.by_document[doc].nats += float(nats.sum())
        self.by_document[doc].tokens += nats.numel()
        self.total.nats += float(nats.sum())
        self.total.tokens += nats.numel()

    def report(self, names: list[str]) -> dict:
        ends = list(self.buckets[1:]) + [None]
        return {
            "bpb": self.total.bits_per_token(), "tokens": self.total.tokens,
            "by_position": [{"start": start, "end": end, "tokens": t.tokens, "bpb": t.bits_per_token()}
                            for start, end, t in zip(self.buckets, ends, self.by_position) if t.tokens],
            "documents": [{"name": name, "tokens": t.tokens, "bpb": t.bits_per_token()}
                          for name, t in zip(names, self.by_document) if t.tokens],  # empty files score nothing
        }


@torch.no_grad()
def stream_bpb(model: InfoMamba, documents: list[torch.Tensor], names: list[str] | None = None,
               chunk_len: int = 4096, batch_size: int = 8, reset_every: int | None = None,
               buckets: tuple[int, ...] = POSITION_BUCKETS) -> dict:
    """Bits per token (bytes, plus each document's end-of-file token) of `documents` ((n,) token ids each), every
    one streamed whole from an empty state through the serving path in chunks of `chunk_len`, `batch_size`
    documents at a time (one pool slot each). reset_every: empty the state every that many tokens (windows).
    Returns {"bpb", "tokens", "by_position": [{"start", "end", "tokens", "bpb"}], "documents": [...]}."""
    if model.config.head != "lm":
        raise ValueError("stream_bpb: needs a language model (head 'lm')")
    if reset_every is not None:
        chunk_len = min(chunk_len, reset_every)
        if reset_every % chunk_len:
            raise ValueError(f"stream_bpb: reset_every {reset_every} is not a multiple of chunk_len {chunk_len}")
    names = names or [str(i) for i in range(len(documents))]
    result = StreamEval(tuple(buckets), by_position=[_Tally() for _ in buckets],
                        by_document=[_Tally() for _ in documents])
    was_training = model.training
    model.eval()
    pool = model.empty_state(batch_size)
    queue = [i for i, doc in enumerate(documents) if doc.numel() >= 2]
    lanes: list[_Lane | None] = [None] * batch_size
    while queue or any(lanes):
        for slot in range(batch_size):
            if lanes[slot] is None and queue:
                lanes[slot] = _Lane(queue.pop(0))
                pool.reset([slot])
        _stream_round(model, documents, lanes, pool, chunk_len, reset_every, result)
    model.train(was_training)
    return result.report(names)


def _stream_round(model, documents, lanes, pool, chunk_len, reset_every, result: StreamEval) -> None:
    """One packed forward over each live lane's next chunk; lanes whose document is done are freed."""
    live = [(slot, lane) for slot, lane in enumerate(lanes) if lane is not None]
    pieces, lengths = [], []
    for slot, lane in live:
        if reset_every is not None and lane.offset and lane.offset % reset_every == 0:
            pool.reset([slot])
        doc = documents[lane.doc]
        n = min(chunk_len, doc.numel() - 1 - lane.offset)  # inputs whose next token exists
        pieces.append(doc[lane.offset:lane.offset + n])
        lengths.append(n)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    slots = torch.tensor([slot for slot, _ in live], dtype=torch.int32)
    out, _ = model(torch.cat(pieces).to(model.device), pool, cu_seqlens=cu, state_indices=slots)
    logits = out.head.float().cpu()  # (total, vocab)
    for (slot, lane), start, n in zip(live, cu[:-1].tolist(), lengths):
        doc = documents[lane.doc]
        targets = doc[lane.offset + 1:lane.offset + 1 + n].long()
        nats = F.cross_entropy(logits[start:start + n], targets, reduction="none")
        result.add(lane.doc, torch.arange(lane.offset + 1, lane.offset + 1 + n), nats)
        lane.offset += n
        if lane.offset >= doc.numel() - 1:
            lanes[slot] = None


def read_documents(paths: list[str]) -> tuple[list[torch.Tensor], list[str]]:
    """Files (or every *.py under a directory, sorted) as byte token ids plus one end-of-file token each."""
    files = []
    for p in map(Path, paths):
        files += [p / name for name in list_files(p)] if p.is_dir() else [p]
    docs = [torch.tensor(list(f.read_bytes()) + [ByteTokenizer.eos_id], dtype=torch.long) for f in files]
    return docs, [str(f) for f in files]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("paths", nargs="*", help="files or directories (*.py); default: the stdlib held-out split")
    p.add_argument("--chunk-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reset-every", type=int, default=None, help="empty the state every N tokens (windows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the full report here")
    args = p.parse_args(argv)
    model = load_model(args.model_dir, device=args.device)
    if args.paths:
        groups = {"given files": args.paths}
    else:  # the held-out split, its near-duplicates of training files reported apart
        corpus = load_corpus()
        overlap = line_overlap(corpus.root, corpus.train_files, corpus.held_out_files)
        for name, share in overlap.items():
            print(f"held out: {name}: {100 * share:.0f}% of its lines are in training files")
        clean, near = split_near_duplicates(overlap)
        groups = {"held out, clean": [str(corpus.root / f) for f in clean],
                  f"held out, near-duplicates (>= {100 * NEAR_DUPLICATE_OVERLAP:.0f}% lines seen)":
                  [str(corpus.root / f) for f in near]}
    reports = {}
    for label, paths in groups.items():
        if not paths:
            continue
        docs, names = read_documents(paths)
        report = reports[label] = stream_bpb(model, docs, names, args.chunk_len, args.batch_size, args.reset_every)
        print(f"== {label}")
        for row in report["by_position"]:
            end = row["end"] if row["end"] is not None else "..."
            print(f"positions {row['start']:>7}-{end:<7} {row['tokens']:>9,} tokens  {row['bpb']:.4f} bpb")
        print(f"all {report['tokens']:,} tokens of {len(docs)} documents: {report['bpb']:.4f} bpb")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
