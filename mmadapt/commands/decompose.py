"""``mmadapt decompose --preset P --out DIR (--rank R | --ratio F)``: LoRD low-rank factoring."""

from __future__ import annotations

import argparse

from ..errors import InputError

CALIBRATION_BATCH = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="preset whose LLM is factored (models/smollm2-vision.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder for the prepared model")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, metavar="R", help="one rank for every targeted layer")
    size.add_argument(
        "--ratio", type=float, metavar="F",
        help="fraction of each targeted layer's parameters kept, in (0, 1): r = floor(F·out·in/(out+in))",
    )
    parser.add_argument(
        "--targets", nargs="+", metavar="T",
        help="module-name suffixes or re:<regex> (default: q/k/v/o_proj and gate/up/down_proj)",
    )
    parser.add_argument("--data-free", action="store_true", help="truncated SVD of W instead of calibration outputs")
    parser.add_argument(
        "--calibration", metavar="JSONL", help="calibration text (default: data/heldout_text/calibration.jsonl)"
    )
    parser.add_argument(
        "--heldout", metavar="JSONL", help="text scored before and after (default: data/heldout_text/heldout.jsonl)"
    )
    parser.add_argument("--seq-len", type=int, default=128, metavar="N", help="calibration sequence length in tokens")
    parser.add_argument("--seed", type=int, default=0, help="seeds a random preset's LLM weights")


def run(args: argparse.Namespace) -> None:
    """Factor the preset's linear layers and write the prepared folder."""
    from ..prepare.lord import DEFAULT_TARGETS, decompose, input_covariances, plan_ranks
    from ..prepare.pipeline import check_new_folder, prepare, summary
    from ..prepare.text import CALIBRATION, HELDOUT, packed_batches, read_texts

    out = check_new_folder(args.out)
    if args.seq_len < 1:
        raise InputError(f"decompose: --seq-len must be at least 1, got {args.seq_len}")
    targets = args.targets or list(DEFAULT_TARGETS)
    calibration_file = None if args.data_free else args.calibration or CALIBRATION
    calibration = None if args.data_free else read_texts(calibration_file, "--calibration")

    def plan(model):
        return plan_ranks(model, targets, rank=args.rank, ratio=args.ratio)

    def factor(model, tokenizer):
        ranks = plan(model)
        covariances = None
        if calibration is not None:
            batches = packed_batches(tokenizer, calibration, args.seq_len, CALIBRATION_BATCH, "--calibration")
            covariances = input_covariances(model, ranks, batches)
        return decompose(model, ranks, covariances)

    settings = {
        "rank": args.rank, "ratio": args.ratio, "targets": targets, "data_free": args.data_free,
        "calibration": None if calibration_file is None else str(calibration_file), "seq_len": args.seq_len,
    }
    meta = prepare(args.preset, out, "lord", settings, plan, factor, str(args.heldout or HELDOUT), seed=args.seed)
    print(summary(meta, out))
