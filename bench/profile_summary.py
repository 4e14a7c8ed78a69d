"""Where a process spent its samples: reads py-spy's raw (collapsed) stacks, as `bench_server.py --profile`
writes them, and prints the functions with the most samples, inclusive and self.

    python bench/profile_summary.py PROFILE_DIR [--top 25]
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def summarize(path: Path, top: int) -> str:
    stacks = read_stacks(path)
    total = sum(n for _, n in stacks) or 1
    inclusive, own = collections.Counter(), collections.Counter()
    for frames, n in stacks:
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"== {path} ({total} samples)", "  inclusive:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["  self:"] + [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    for path in sorted(args.directory.rglob("*.txt")):
        print(summarize(path, args.top))


if __name__ == "__main__":
    main()
