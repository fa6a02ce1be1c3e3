"""`python -m smolora <command>`: the product's top-level commands."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from smolora import quickstart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smolora", description="Train, serve and operate SMoLoRA VLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    quickstart.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
