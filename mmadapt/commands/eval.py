"""``mmadapt eval --checkpoint OUT``: a finished run's task metrics on its eval set, as JSON."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="OUT", help="a training output folder")


def run(args: argparse.Namespace) -> None:
    from ..build import eval_datasets, load_trained
    from ..config import load_config
    from ..evaluate import evaluation

    cfg = load_config(f"{args.checkpoint}/config.yaml")
    if cfg.data.eval is None:
        raise InputError(f"{args.checkpoint}/config.yaml has no data.eval to evaluate on")
    model = load_trained(args.checkpoint)
    eval_sets, _ = eval_datasets(cfg, model)
    print(json.dumps(evaluation(model, model, eval_sets, cfg)))
