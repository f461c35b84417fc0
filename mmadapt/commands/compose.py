"""``mmadapt compose --checkpoint OUT --instruction T --images DIR --out DIR``: an illustrated article."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="OUT", help="a training output folder")
    parser.add_argument("--instruction", required=True, metavar="T", help="what to write")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of candidate images")
    parser.add_argument("--out", required=True, metavar="DIR", help="where article.md, article.html, decisions.json go")
    parser.add_argument(
        "--num-images", default="auto", metavar="N|auto",
        help="how many images; auto: the outline's [image] marks, else the model decides (default)",
    )
    parser.add_argument(
        "--outline", metavar="FILE",
        help="text file, one paragraph topic per line; a line ending in [image] gets an image after it",
    )
    parser.add_argument(
        "--reference", action="append", default=[], metavar="F",
        help="an image the model sees with the instruction (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds every sampled token")
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0: greedy; above 0: sample at this temperature"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, metavar="N",
        help="longest article (no outline) or paragraph (with an outline), in tokens",
    )
    parser.add_argument("--clip", metavar="MODEL_NAME", help="rank images with this open_clip model instead")
    parser.add_argument("--clip-weights", metavar="FILE", help="the local open_clip checkpoint for --clip")
    parser.add_argument(
        "--caption-prompt", metavar="T",
        help="the question a caption answers when the model ranks images, as in its training data "
        "(default: 'Describe the picture.')",
    )
    parser.add_argument(
        "--closing-weight", type=float, metavar="W",
        help="likelihood ranker: weight of a caption's closing tokens, of its words from the first one no "
        "candidate explains, and again of each such word (default 0.1)",
    )
    parser.add_argument(
        "--unexplained-below", type=float, metavar="P",
        help="likelihood ranker: a caption word below this probability under every candidate is unexplained; "
        "the first ends the words counted in full (default 0.001; 0: none is)",
    )


def run(args: argparse.Namespace) -> None:
    """Compose, streaming the article to stdout and the ranking progress to stderr."""
    from ..inference.chat import ChatSession
    from ..inference.compose import compose
    from ..inference.rank import CAPTION_PROMPT, ClipRanker, LikelihoodRanker

    if bool(args.clip) != bool(args.clip_weights):
        raise InputError("compose: --clip and --clip-weights go together (open_clip weights are only read locally)")
    likelihood = {"closing_weight": args.closing_weight, "unexplained_below": args.unexplained_below}
    likelihood = {key: value for key, value in likelihood.items() if value is not None}
    if args.clip and (likelihood or args.caption_prompt):
        raise InputError("compose: --caption-prompt, --closing-weight and --unexplained-below set the model's own "
                         "ranker; they do nothing with --clip")
    outline = _read_outline(args.outline) if args.outline else None
    session = ChatSession.from_run(args.checkpoint)
    device = next(session.model.parameters()).device
    if args.clip:
        ranker = ClipRanker(args.clip, args.clip_weights, device)
    else:
        prompt = args.caption_prompt or CAPTION_PROMPT
        ranker = LikelihoodRanker(session.model, session.system_prompt, prompt, name=args.checkpoint, **likelihood)
    out = compose(
        session.model, args.instruction, args.images, args.out, num_images=args.num_images, outline=outline,
        references=args.reference, seed=args.seed, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, ranker=ranker, system_prompt=session.system_prompt,
        on_text=lambda piece: print(piece, end="", flush=True), progress=True,
    )
    print(flush=True)
    print(f"wrote {out / 'article.md'}, {out / 'article.html'} and {out / 'decisions.json'}", file=sys.stderr)


def _read_outline(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--outline {path}: cannot read it ({error})") from None
