"""``mmadapt chat --checkpoint OUT``: answer images, audio and text, once or interactively."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="OUT", help="a training output folder")
    parser.add_argument("--image", action="append", default=[], metavar="F", help="an image file (repeatable)")
    parser.add_argument(
        "--audio", action="append", default=[], metavar="F",
        help="an audio file (repeatable); without --text the speech is the instruction",
    )
    parser.add_argument("--text", metavar="T", help="the instruction or question")
    parser.add_argument(
        "--interactive", action="store_true",
        help="after the answer, answer follow-up lines from stdin until EOF, an empty line or 'exit'",
    )
    parser.add_argument("--json", action="store_true", help='print {"answer": ..., "tokens": n} instead of streaming')
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="longest answer in tokens")
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0: greedy; above 0: sample at this temperature"
    )


def run(args: argparse.Namespace) -> None:
    """Answer the command line's turn, then (``--interactive``) each follow-up line."""
    from ..inference.chat import ChatSession

    has_input = bool(args.text or args.image or args.audio)
    if not has_input and not args.interactive:
        raise InputError("chat: nothing to answer; give --text, --image or --audio (or --interactive)")
    if args.max_new_tokens < 1 or args.temperature < 0:
        raise InputError("chat: --max-new-tokens must be at least 1 and --temperature at least 0")
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.temperature > 0,
        "temperature": args.temperature or 1.0,
    }
    session = ChatSession.from_run(args.checkpoint)
    if has_input:
        _turn(session, args.json, settings, text=args.text, images=args.image, audios=args.audio)
    if args.interactive:
        for line in _follow_ups():
            _turn(session, args.json, settings, text=line)


def _turn(session, as_json: bool, settings: dict, **turn) -> None:
    if as_json:
        answer, tokens = session.ask(**turn, **settings)
        print(json.dumps({"answer": answer, "tokens": tokens}), flush=True)
        return
    session.ask(**turn, **settings, on_text=lambda piece: print(piece, end="", flush=True))
    print(flush=True)


def _follow_ups() -> Iterator[str]:
    """Typed lines until EOF, an empty line or ``exit``."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().strip()
        if not line or line == "exit":
            return
        yield line
