"""``mmadapt infer --checkpoint OUT --input requests.jsonl --output answers.jsonl``: batch answers, resumable."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="OUT", help="a training output folder")
    parser.add_argument(
        "--input", required=True, metavar="FILE",
        help="JSONL requests in the training schema; files are relative to its folder",
    )
    parser.add_argument(
        "--output", required=True, metavar="FILE",
        help='JSONL answers, one {"id", "answer", "tokens"} per line; ids already in it are skipped',
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts decoded together")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="longest answer in tokens")
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0: greedy; above 0: sample at this temperature"
    )


def run(args: argparse.Namespace) -> None:
    """Answer every request of ``--input`` not yet in ``--output``, appending as batches finish."""
    from ..inference.batch import answer_requests, read_requests, resume_output
    from ..inference.prompts import load_run

    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        raise InputError("infer: --batch-size and --max-new-tokens must be at least 1 and --temperature at least 0")
    model, cfg = load_run(args.checkpoint)
    requests = read_requests(args.input, model, cfg.data, name=args.checkpoint)
    answered = resume_output(args.output)
    todo = [request for request in requests if request.id not in answered]
    answer_requests(
        model, todo, args.output, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
    )
    print(f"infer: answered {len(todo)}, {len(requests) - len(todo)} already in {args.output}", file=sys.stderr)
