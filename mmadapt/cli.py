"""The ``mmadapt`` command: one sub-command per module of ``mmadapt.commands``.

Each command module defines ``add_arguments(parser)`` and ``run(args)``, and imports
torch-heavy modules inside ``run`` only, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import InputError

COMMANDS = {
    "config": "show configuration keys",
    "eval": "recompute a finished run's task metrics on its eval set",
    "chat": "answer about images and speech with a trained run",
    "infer": "answer a JSONL of requests in batches with a trained run",
    "compose": "write an illustrated article, choosing images from a local folder",
    "serve": "a local web demo: composition, image chat and speech chat",
    "prune": "LoRAPrune: a structurally pruned copy of a preset's LLM",
    "decompose": "LoRD: a copy of a preset's LLM with low-rank factored linear layers",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmadapt", description="Adapt language models to images and speech.")
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(f"mmadapt.commands.{name}") for name in COMMANDS}
    for name, help_text in COMMANDS.items():
        modules[name].add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        modules[args.command].run(args)
    except (InputError, FileNotFoundError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0

