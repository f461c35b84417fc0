"""Shared test helpers: a small slice of the shapes data and train.py runs on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "data" / "shapes"
SPEECH = REPO / "data" / "speech"
# Set by an in-process run in another test; a subprocess must start its own process group.
LAUNCHER_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
TINY = [
    "model=models/tiny.yaml", "data.max_length=512", "train.log_every=1", "train.align_steps=0",
    "train.batch_size=4", "eval.batch_size=8",
]


def shapes_subset(folder: Path, n_train: int = 32, n_test: int = 8) -> dict[str, Path]:
    """Write the first records of the shapes splits to ``folder`` with absolute image paths."""
    return _subset(SHAPES, "images", folder, n_train, n_test)


def speech_subset(folder: Path, n_train: int = 16, n_test: int = 8) -> dict[str, Path]:
    """Write the first records of the bundled speech splits to ``folder`` with absolute audio paths."""
    return _subset(SPEECH, "audios", folder, n_train, n_test)


def _subset(source: Path, files: str, folder: Path, n_train: int, n_test: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", n_train), ("test", n_test)):
        lines = (source / f"{split}.jsonl").read_text().splitlines()[:count]
        records = [json.loads(line) for line in lines]
        for record in records:
            record[files] = [str(source / p) for p in record[files]]
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def tiny_overrides(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.train={data['train']}", f"data.eval={data['test']}", f"train.output_dir={out}", *extra]


def run_train(
    overrides: list[str], launcher: list[str] | None = None, timeout: int = 600, recipe: str = "xcomposer"
) -> subprocess.CompletedProcess:
    """Run ``train.py`` with a recipe as a subprocess (plain python unless a launcher is given)."""
    command = [*(launcher or [sys.executable]), "train.py", "--config", f"configs/{recipe}.yaml", *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=train_env())


def train_env() -> dict[str, str]:
    """This environment without a launcher's variables (an in-process run may have set them)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    return env


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def deepspeed_launcher(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), *args]
