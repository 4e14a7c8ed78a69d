"""The training corpus: the Python standard library's own .py source, as bytes.

Files: every `*.py` under `sysconfig.get_paths()["stdlib"]`, skipping `site-packages`/`dist-packages`,
sorted by their path relative to that root (POSIX form). Split: a file is held out when
`int(sha256(relative_path).hexdigest()[:8], 16) % 1000 < 20` (about 2%), otherwise it is training data.
The split depends on the path alone, so it is the same on every install and Python version that has the file.
Stream: each split's files, in order, each file's bytes followed by one end-of-file token (ByteTokenizer.eos_id).
Documents: the stream cut after each end-of-file token (`split_documents`); `DocumentStreams` feeds them whole, in
consecutive windows, to training with the state carried between windows (DESIGN.md §1).
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from model.tokenizer import ByteTokenizer

HELD_OUT_PER_MILLE = 20
SKIPPED_DIRS = ("site-packages", "dist-packages")
IGNORE_INDEX = -100  # target of a padded position (F.cross_entropy's default ignore_index)


@dataclass
class Corpus:
    root: Path
    train_files: list[str]
    held_out_files: list[str]
    train: torch.Tensor  # (num_train_tokens,) int16
    held_out: torch.Tensor  # (num_held_out_tokens,) int16

    def describe(self) -> dict:
        return {"root": str(self.root), "num_train_files": len(self.train_files),
                "num_held_out_files": len(self.held_out_files), "num_train_tokens": int(self.train.numel()),
                "num_held_out_tokens": int(self.held_out.numel())}


def is_held_out(relative_path: str) -> bool:
    return int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 1000 < HELD_OUT_PER_MILLE


def list_files(root: Path) -> list[str]:
    paths = (p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())
    return sorted(p for p in paths if not any(part in SKIPPED_DIRS for part in p.split("/")))


def load_corpus(root: str | Path | None = None, max_files: int | None = None) -> Corpus:
    """root: defaults to this interpreter's stdlib; max_files: keep only the first files (tests, smoke runs)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = list_files(root)[:max_files]
    train_files = [f for f in files if not is_held_out(f)]
    held_out_files = [f for f in files if is_held_out(f)]
    return Corpus(root, train_files, held_out_files, _stream(root, train_files), _stream(root, held_out_files))


def _stream(root: Path, files: list[str]) -> torch.Tensor:
    if not files:
        return torch.zeros(0, dtype=torch.int16)
    eof = bytes([0])  # placeholder byte, replaced by the eos id below
    parts, ends, offset = [], [], 0
    for name in files:
        data = (root / name).read_bytes()
        parts.append(data + eof)
        offset += len(data) + 1
        ends.append(offset - 1)
    tokens = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).to(torch.int16)
    if ends:
        tokens[torch.tensor(ends)] = ByteTokenizer.eos_id
    return tokens


def random_windows(tokens: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length + 1) windows at uniform random offsets: inputs [:, :-1], targets [:, 1:]."""
    starts = torch.randint(0, tokens.numel() - length - 1, (batch,), generator=generator, device=tokens.device)
    return tokens[starts[:, None] + torch.arange(length + 1, device=tokens.device)].long()


def eval_windows(tokens: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping (num, length + 1) windows from the start of the stream (each shares one token with the next)."""
    num = min(max_windows, (tokens.numel() - 1) // length)
    starts = torch.arange(num, device=tokens.device) * length
    return tokens[starts[:, None] + torch.arange(length + 1, device=tokens.device)].long()


def split_documents(tokens: torch.Tensor, min_tokens: int = 2) -> list[torch.Tensor]:
    """The stream cut after each end-of-file token: one (n,) tensor per file, its eos included, keeping those of at
    least `min_tokens` (an empty file is its eos alone: nothing to predict). Bytes are < 256, so an eos id in the
    stream is always a file's end."""
    ends = (torch.nonzero(tokens == ByteTokenizer.eos_id).flatten() + 1).tolist()
    if not ends or ends[-1] != tokens.numel():
        ends.append(tokens.numel())
    starts = [0] + ends[:-1]
    return [tokens[a:b] for a, b in zip(starts, ends) if b - a >= min_tokens]


@dataclass
class Windows:
    inputs: torch.Tensor  # (batch, length) token ids, pad_id past a document's end
    targets: torch.Tensor  # (batch, length) next token ids, IGNORE_INDEX past a document's end
    fresh: torch.Tensor  # (batch,) bool: the lane starts a document with this window (reset its state first)


class DocumentStreams:
    """`batch` lanes, each reading whole documents in consecutive windows of `length` tokens, so that a model
    trained on them with its state carried from one window to the next (truncated backpropagation through time)
    sees what serving feeds it: a file streamed from an empty state. A lane's next window continues where its last
    one ended; a document's last window is padded; then the lane takes the next document, in an order shuffled
    by `generator` and reshuffled each pass over the documents."""

    def __init__(self, documents: list[torch.Tensor], batch: int, length: int, generator: torch.Generator):
        if not documents:
            raise ValueError("DocumentStreams: no documents (each needs at least two tokens)")
        self.documents, self.batch, self.length, self.generator = documents, batch, length, generator
        self._order: list[int] = []
        self._lanes = [self._next_document() for _ in range(batch)]  # [document index, offset]

    def _next_document(self) -> list[int]:
        if not self._order:
            self._order = torch.randperm(len(self.documents), generator=self.generator).tolist()
        return [self._order.pop(), 0]

    def next_windows(self) -> Windows:
        inputs = torch.full((self.batch, self.length), ByteTokenizer.pad_id, dtype=torch.long)
        targets = torch.full((self.batch, self.length), IGNORE_INDEX, dtype=torch.long)
        fresh = torch.zeros(self.batch, dtype=torch.bool)
        for lane, position in enumerate(self._lanes):
            if position[1] >= self.documents[position[0]].numel() - 1:  # the document has no target left
                position[:] = self._next_document()
            doc, offset = self.documents[position[0]], position[1]
            fresh[lane] = offset == 0
            n = min(self.length, doc.numel() - 1 - offset)
            inputs[lane, :n] = doc[offset:offset + n]
            targets[lane, :n] = doc[offset + 1:offset + n + 1]
            position[1] = offset + n
        return Windows(inputs=inputs, targets=targets, fresh=fresh)
