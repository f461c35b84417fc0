"""Generates the bundled "shapes" data set: small pictures of coloured shapes.

    python data/make_shapes.py                      # data/shapes/, 4000 train + 200 test
    python data/make_shapes.py --out /tmp/s --train 20 --test 5 --seed 1

Each picture holds 1-3 shapes (circle, square, triangle) in pure colours (red,
green, blue, yellow) on a light background. Shapes occupy disjoint column ranges,
so the caption can list them left to right ("A red circle and a blue square.").
A quarter of the train records add a second turn asking for the number of shapes
or the colour of a shape that appears once. The same seed writes the same bytes.
"""

import argparse
import json
import random
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUND = (235, 235, 235)
COLOURS = {
    "red": (230, 25, 25),
    "green": (20, 170, 20),
    "blue": (25, 60, 230),
    "yellow": (245, 200, 0),
}
KINDS = ("circle", "square", "triangle")
NUMBERS = ("One", "Two", "Three")
PROMPT = "<image>\nDescribe the picture."
MIN_SIDE, MAX_SIDE = 12, 18
GAP = 2  # blank columns between shapes and at the borders, so shapes never touch
FOLLOW_UP_FRACTION = 0.25


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its kind, colour name and bounding box (x0, y0, x1, y1)."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]


def sample_scene(rng: random.Random, size: int) -> list[Shape]:
    """Draws 1-3 shapes with random kinds, colours, sizes and free space between.

    Args:
        rng: The source of randomness.
        size: Picture width and height in pixels.

    Returns:
        The shapes ordered left to right; their column ranges are disjoint.
    """
    n = rng.randint(1, 3)
    widest = min(MAX_SIDE, (size - GAP * (n + 1)) // n)
    sides = [rng.randint(MIN_SIDE, widest) for _ in range(n)]
    # Split the spare columns into n + 1 random gaps (before, between, after).
    spare = size - sum(sides) - GAP * (n + 1)
    cuts = sorted(rng.randint(0, spare) for _ in range(n))
    gaps = [b - a for a, b in pairwise([0, *cuts])]
    x = GAP
    shapes = []
    for side, extra in zip(sides, gaps, strict=True):
        x += extra
        y = rng.randint(GAP, size - GAP - side)
        kind, colour = rng.choice(KINDS), rng.choice(sorted(COLOURS))
        shapes.append(Shape(kind, colour, (x, y, x + side - 1, y + side - 1)))
        x += side + GAP
    return shapes


def draw(shapes: list[Shape], size: int) -> Image.Image:
    """Renders shapes without anti-aliasing, so every pixel is a pure colour.

    Args:
        shapes: What to draw.
        size: Picture width and height in pixels.

    Returns:
        An RGB picture.
    """
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for shape in shapes:
        fill = COLOURS[shape.colour]
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            pen.ellipse(shape.box, fill=fill)
        elif shape.kind == "square":
            pen.rectangle(shape.box, fill=fill)
        else:
            pen.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def caption(shapes: list[Shape]) -> str:
    """Lists the shapes left to right: "A red circle, a blue square and a green triangle."

    Args:
        shapes: The scene, ordered left to right.

    Returns:
        The canonical one-sentence description.
    """
    names = [f"a {s.colour} {s.kind}" for s in shapes]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def follow_up(rng: random.Random, shapes: list[Shape]) -> tuple[str, str]:
    """Picks a second question about the scene and its answer.

    Args:
        rng: The source of randomness.
        shapes: The scene.

    Returns:
        ``(question, answer)``: how many shapes there are, or the colour of a kind
        that appears exactly once.
    """
    kinds = [s.kind for s in shapes]
    unique = [s for s in shapes if kinds.count(s.kind) == 1]
    if unique and rng.random() < 0.5:
        shape = rng.choice(unique)
        return f"What colour is the {shape.kind}?", shape.colour.capitalize() + "."
    return "How many shapes are there?", NUMBERS[len(shapes) - 1] + "."


def make_record(rng: random.Random, split: str, index: int, size: int, out: Path) -> dict:
    """Samples a scene, saves its picture under ``out/images`` and returns its record.

    Args:
        rng: The source of randomness.
        split: "train" or "test"; only train records get a follow-up turn.
        index: Position within the split, used in the id.
        size: Picture width and height in pixels.
        out: The data set folder that holds the JSONL files.

    Returns:
        A record in the schema of ``data/README.md``.
    """
    record_id = f"{split}-{index:05d}"
    shapes = sample_scene(rng, size)
    image_path = f"images/{record_id}.png"
    draw(shapes, size).save(out / image_path, optimize=True)
    messages = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": caption(shapes)},
    ]
    if split == "train" and rng.random() < FOLLOW_UP_FRACTION:
        question, answer = follow_up(rng, shapes)
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    return {"id": record_id, "messages": messages, "images": [image_path], "audios": []}


def generate(out: Path, n_train: int, n_test: int, size: int, seed: int) -> None:
    """Writes ``out/train.jsonl``, ``out/test.jsonl`` and ``out/images/*.png``.

    Args:
        out: Destination folder, created if missing.
        n_train: Number of train records.
        n_test: Number of test records.
        size: Picture width and height in pixels.
        seed: Random seed; the same seed writes byte-identical files.
    """
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [make_record(rng, split, i, size, out) for i in range(n)]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def main() -> None:
    """Parses the command line and generates the data set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/shapes"))
    parser.add_argument("--train", type=int, default=4000, help="number of train records")
    parser.add_argument("--test", type=int, default=200, help="number of test records")
    parser.add_argument("--size", type=int, default=48, help="picture side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size < 3 * MIN_SIDE + 4 * GAP:
        parser.error(f"--size must be at least {3 * MIN_SIDE + 4 * GAP} to fit three shapes")
    generate(args.out, args.train, args.test, args.size, args.seed)


if __name__ == "__main__":
    main()
