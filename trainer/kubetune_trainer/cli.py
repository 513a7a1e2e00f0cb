"""The ``kubetune-trainer`` command, the entrypoint of training and serving pods."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune-trainer", description=__doc__)
    parser.add_argument("--version", action="version", version="kubetune-trainer 0.1.0")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
