"""The `infomamba` command: serve, convert, and client commands."""
from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from model.convert import convert_mamba
    from model.weights import WeightsError

    try:
        dst = convert_mamba(args.src, args.dst, name=args.name, progress=not args.quiet)
    except (WeightsError, ValueError) as exc:
        print(f"infomamba convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infomamba", description="InfoMamba Serve: a recurrent-state model server.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert a Hugging Face MambaForCausalLM directory to InfoMamba (k = 0)")
    convert.add_argument("src", help="directory with config.json and model.safetensors")
    convert.add_argument("dst", help="output model directory")
    convert.add_argument("--name", default=None, help="model name (default: the source directory's name)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
