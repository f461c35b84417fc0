"""``mmadapt prune --preset P --out DIR [--ratio F]``: LoRAPrune structured pruning."""

from __future__ import annotations

import argparse

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="preset whose LLM is pruned (models/smollm2-vision.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder for the prepared model")
    parser.add_argument(
        "--ratio", type=float, default=0.5, metavar="F",
        help="fraction of each prunable layer's attention groups and MLP channels removed, in (0, 1)",
    )
    parser.add_argument("--steps", type=int, default=40, help="LoRA training steps that score the groups")
    parser.add_argument("--prune-freq", type=int, default=10, metavar="N", help="steps between pruning events")
    parser.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, metavar="N", help="tokens per training sequence")
    parser.add_argument(
        "--calibration", metavar="JSONL", help="text the LoRA trains on (default: data/heldout_text/calibration.jsonl)"
    )
    parser.add_argument(
        "--heldout", metavar="JSONL", help="text scored before and after (default: data/heldout_text/heldout.jsonl)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the LoRA, its dropout and a random preset's LLM")


def run(args: argparse.Namespace) -> None:
    """Score, mask and cut the preset's LLM, and write the prepared folder."""
    import torch

    from ..prepare.loraprune import PruneSettings, group_sets, lora_prune
    from ..prepare.pipeline import check_new_folder, prepare, summary
    from ..prepare.text import CALIBRATION, HELDOUT, packed_batches, read_texts

    out = check_new_folder(args.out)
    _check_ranges(args)
    calibration_file = args.calibration or CALIBRATION
    calibration = read_texts(calibration_file, "--calibration")
    settings = PruneSettings(
        ratio=args.ratio, steps=args.steps, prune_freq=args.prune_freq, lr=args.lr, r=args.r, alpha=args.alpha
    )
    history = []

    def prune(model, tokenizer):
        batches = packed_batches(tokenizer, calibration, args.seq_len, args.batch_size, "--calibration")
        torch.manual_seed(args.seed)
        replaced, events = lora_prune(model, batches, settings)
        history.extend(events)
        return replaced

    recorded = {
        **vars(settings), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "calibration": str(calibration_file), "seed": args.seed, "history": history,
    }
    heldout = str(args.heldout or HELDOUT)
    meta = prepare(args.preset, out, "loraprune", recorded, group_sets, prune, heldout, seed=args.seed)
    print(summary(meta, out))


def _check_ranges(args: argparse.Namespace) -> None:
    if not 0 < args.ratio < 1:
        raise InputError(f"prune: --ratio is the fraction of groups removed, in (0, 1); got {args.ratio}")
    for option in ("steps", "prune_freq", "r", "batch_size"):
        if getattr(args, option) < 1:
            raise InputError(f"prune: --{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.seq_len < 2:
        raise InputError(f"prune: --seq-len must be at least 2 (a next-token loss), got {args.seq_len}")
    if args.lr <= 0:
        raise InputError(f"prune: --lr must be positive, got {args.lr}")
