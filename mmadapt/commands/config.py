"""``mmadapt config --reference``: every configuration key with its default and help."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", action="store_true", help="print every key with its default and help")


def run(args: argparse.Namespace) -> None:
    from ..config import reference

    print(reference())
