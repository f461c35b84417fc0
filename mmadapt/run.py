"""The training job behind ``train.py``: config -> model -> data -> Trainer."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from . import checkpoint, distributed
from .build import build_model, eval_datasets, model_dataset, random_tensor_names
from .config import Config, load_config, save_config
from .errors import InputError
from .export import save_base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train an mmadapt model (plain python or under deepspeed).")
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/xcomposer.yaml")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run training; bad input prints one line (rank 0) and returns 2."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (InputError, FileNotFoundError, ValidationError) as error:
        if distributed.env_rank() == 0:
            print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def train(cfg: Config) -> None:
    """Build everything the config names and train it; see ``mmadapt.trainer``."""
    from .trainer import Trainer

    distributed.init(cfg.train.threads)
    out = Path(cfg.train.output_dir)
    resume_from = checkpoint.resolve_resume(out, cfg.train.resume)
    model = build_model(cfg)
    train_set, eval_sets = _datasets(cfg, model)
    distributed.barrier()
    if distributed.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        save_base(model, out, random_tensor_names(model))
    distributed.barrier()
    trainer = Trainer(cfg, model, train_set, eval_sets)
    trainer.setup(resume_from)
    trainer.train()


def _datasets(cfg: Config, model):
    train_set, skipped = model_dataset(cfg, model, cfg.data.train)
    _report_skipped(cfg.data.train, skipped, cfg)
    if cfg.data.eval is None:
        return train_set, None
    eval_sets, skipped = eval_datasets(cfg, model)
    _report_skipped(cfg.data.eval, skipped, cfg)
    return train_set, eval_sets


def _report_skipped(path: str, skipped: Counter, cfg: Config) -> None:
    if not skipped or distributed.rank() != 0:
        return
    total = sum(skipped.values())
    print(f"skipped {total} bad records of {path}: {json.dumps(dict(skipped))}", file=sys.stderr)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "skipped.json"
    previous = json.loads(report.read_text()) if report.exists() else {}
    report.write_text(json.dumps({**previous, path: dict(skipped)}, indent=2) + "\n")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
