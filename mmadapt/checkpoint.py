"""Training checkpoints: DeepSpeed's own format plus our RNG state and a COMPLETE marker.

A checkpoint folder ``OUT/checkpoints/step-N/`` counts only once ``COMPLETE``
exists; it is written last, after every rank finished writing, so a run killed
mid-save never resumes from a half-written folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import distributed
from .errors import InputError

COMPLETE = "COMPLETE"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(output_dir)
    found = [p for p in root.glob("step-*") if (p / COMPLETE).exists() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save(engine, output_dir: Path, step: int, keep_last: int) -> Path:
    """Save engine, optimizer, scheduler and per-rank RNG state; mark complete; prune old ones."""
    tag = f"step-{step}"
    folder = checkpoint_root(output_dir) / tag
    # Frozen weights come from the preset (or base.safetensors): saving them would cost a full
    # model copy per checkpoint.
    engine.save_checkpoint(
        str(checkpoint_root(output_dir)), tag=tag, client_state={"step": step}, exclude_frozen_parameters=True
    )
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torch.get_rng_state(), folder / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.rank() == 0:
        (folder / COMPLETE).write_text(f"{step}\n")
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return folder


def resolve_resume(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from for ``train.resume`` (auto | path | none)."""
    if resume == "none":
        if output_dir.exists() and any(output_dir.iterdir()):
            raise InputError(
                f"train.output_dir {output_dir} already exists and train.resume=none; "
                "choose a new folder or set train.resume=auto"
            )
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    folder = Path(resume)
    if not (folder / COMPLETE).exists():
        raise InputError(f"train.resume={resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return folder


def load(engine, folder: Path) -> int:
    """Restore a checkpoint into ``engine`` and this rank's RNG; returns its step."""
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
    if client_state is None:
        raise InputError(f"checkpoint {folder} could not be loaded by DeepSpeed")
    rng = folder / f"rng_rank{distributed.rank()}.pt"
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return int(client_state["step"])
