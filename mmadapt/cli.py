"""The ``mmadapt`` command: ``config --reference``, ``eval --checkpoint OUT`` and ``chat --checkpoint OUT``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from .errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmadapt", description="Adapt language models to images and speech.")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="show configuration keys")
    config.add_argument("--reference", action="store_true", help="print every key with its default and help")
    evaluate = commands.add_parser("eval", help="recompute a finished run's task metrics on its eval set")
    evaluate.add_argument("--checkpoint", required=True, help="a training output folder (OUT)")
    _add_chat_parser(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "config":
            from .config import reference

            print(reference())
        elif args.command == "chat":
            _chat(args)
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


def _add_chat_parser(commands) -> None:
    chat = commands.add_parser("chat", help="answer about images and speech with a trained run")
    chat.add_argument("--checkpoint", required=True, metavar="OUT", help="a training output folder")
    chat.add_argument("--image", action="append", default=[], metavar="F", help="an image file (repeatable)")
    chat.add_argument(
        "--audio", action="append", default=[], metavar="F",
        help="an audio file (repeatable); without --text the speech is the instruction",
    )
    chat.add_argument("--text", metavar="T", help="the instruction or question")
    chat.add_argument(
        "--interactive", action="store_true",
        help="after the answer, answer follow-up lines from stdin until EOF, an empty line or 'exit'",
    )
    chat.add_argument("--json", action="store_true", help='print {"answer": ..., "tokens": n} instead of streaming')
    chat.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="longest answer in tokens")
    chat.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0: greedy; above 0: sample at this temperature"
    )


def _chat(args: argparse.Namespace) -> None:
    """Answer the command line's turn, then (``--interactive``) each follow-up line."""
    from .inference.chat import ChatSession

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
        _chat_turn(session, args.json, settings, text=args.text, images=args.image, audios=args.audio)
    if args.interactive:
        for line in _follow_ups():
            _chat_turn(session, args.json, settings, text=line)


def _chat_turn(session, as_json: bool, settings: dict, **turn) -> None:
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
