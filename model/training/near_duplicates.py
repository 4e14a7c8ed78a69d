"""Which held-out files nearly duplicate training files: the share of a file's substantial lines (16+ characters
once stripped) that appear verbatim somewhere in the training files. Codec tables (`encodings/cp*.py`) share most of
their lines with each other; ordinary modules share few (imports, docstring boilerplate). Files above a threshold
are reported apart, so a held-out score measures text the model has not, in effect, seen."""
from __future__ import annotations

from pathlib import Path

MIN_LINE_CHARS = 16
NEAR_DUPLICATE_OVERLAP = 0.5


def substantial_lines(data: bytes) -> list[bytes]:
    return [s for s in (line.strip() for line in data.splitlines()) if len(s) >= MIN_LINE_CHARS]


def line_overlap(root: Path, train_files: list[str], held_out_files: list[str]) -> dict[str, float]:
    """Held-out file -> the share of its substantial lines found in the training files (0 for a file without any)."""
    seen = set()
    for name in train_files:
        seen.update(substantial_lines((root / name).read_bytes()))
    overlap = {}
    for name in held_out_files:
        lines = substantial_lines((root / name).read_bytes())
        overlap[name] = sum(line in seen for line in lines) / len(lines) if lines else 0.0
    return overlap


def split_near_duplicates(overlap: dict[str, float], threshold: float = NEAR_DUPLICATE_OVERLAP
                          ) -> tuple[list[str], list[str]]:
    """(clean, near-duplicate) file names, each in the order given."""
    clean = [name for name, share in overlap.items() if share < threshold]
    return clean, [name for name in overlap if name not in clean]
