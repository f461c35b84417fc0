"""The ``mmadapt`` command: ``config --reference`` and ``eval --checkpoint OUT``."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmadapt", description="Adapt language models to images and speech.")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="show configuration keys")
    config.add_argument("--reference", action="store_true", help="print every key with its default and help")
    evaluate = commands.add_parser("eval", help="recompute a finished run's task metrics on its eval set")
    evaluate.add_argument("--checkpoint", required=True, help="a training output folder (OUT)")
    args = parser.parse_args(argv)
    try:
        if args.command == "config":
            from .config import reference

            print(reference())
        else:
            print(json.dumps(_evaluate(args.checkpoint)))
    except (InputError, FileNotFoundError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


def _evaluate(output_dir: str) -> dict:
    from .build import eval_datasets, load_trained
    from .config import load_config
    from .evaluate import evaluation

    cfg = load_config(f"{output_dir}/config.yaml")
    if cfg.data.eval is None:
        raise InputError(f"{output_dir}/config.yaml has no data.eval to evaluate on")
    model = load_trained(output_dir)
    eval_sets, _ = eval_datasets(cfg, model)
    return evaluation(model, model, eval_sets, cfg)
