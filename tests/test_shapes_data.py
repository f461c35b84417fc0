import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmadapt.metrics import parse_shapes, shapes_match

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shapes = _load_script("make_shapes")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _read_pixels(image: Image.Image) -> list[str]:
    """Reads the shapes back from pixels, left to right, independently of the generator."""
    pixels = np.asarray(image)
    palette = {rgb: name for name, rgb in make_shapes.COLOURS.items()}
    ink = (pixels != make_shapes.BACKGROUND).any(axis=2)
    columns = np.flatnonzero(ink.any(axis=0))
    # Shapes own disjoint column ranges, so each run of inked columns is one shape.
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    found = []
    for run in runs:
        region = ink[:, run[0] : run[-1] + 1]
        rows = np.flatnonzero(region.any(axis=1))
        colours = {tuple(int(c) for c in p) for p in pixels[:, run[0] : run[-1] + 1][region]}
        assert len(colours) == 1, colours
        fill = region[rows[0] : rows[-1] + 1].mean()
        kind = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        found.append(f"{palette[colours.pop()]} {kind}")
    return found


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes.generate(out, n_train=60, n_test=10, size=48, seed=3)
    return out


def test_same_seed_writes_identical_bytes(shapes_dir, tmp_path):
    make_shapes.generate(tmp_path, n_train=60, n_test=10, size=48, seed=3)
    for path in sorted(shapes_dir.rglob("*.*")):
        assert path.read_bytes() == (tmp_path / path.relative_to(shapes_dir)).read_bytes(), path


def test_other_seed_differs(shapes_dir, tmp_path):
    make_shapes.generate(tmp_path, n_train=60, n_test=10, size=48, seed=4)
    assert (tmp_path / "train.jsonl").read_bytes() != (shapes_dir / "train.jsonl").read_bytes()


def test_records_follow_schema(shapes_dir):
    train, test = _read(shapes_dir / "train.jsonl"), _read(shapes_dir / "test.jsonl")
    assert (len(train), len(test)) == (60, 10)
    assert len({r["id"] for r in train + test}) == 70
    for record in train + test:
        assert set(record) == {"id", "messages", "images", "audios"}
        assert record["audios"] == []
        assert record["messages"][0] == {"role": "user", "content": "<image>\nDescribe the picture."}
        assert [m["role"] for m in record["messages"]] in (
            ["user", "assistant"],
            ["user", "assistant", "user", "assistant"],
        )
        assert sum(m["content"].count("<image>") for m in record["messages"]) == len(record["images"]) == 1
    assert all(len(r["messages"]) == 2 for r in test)
    assert any(len(r["messages"]) == 4 for r in train)


def test_captions_describe_the_pixels(shapes_dir):
    for record in _read(shapes_dir / "train.jsonl") + _read(shapes_dir / "test.jsonl"):
        image = Image.open(shapes_dir / record["images"][0])
        assert (image.mode, image.size) == ("RGB", (48, 48))
        caption = record["messages"][1]["content"]
        drawn = _read_pixels(image)
        assert 1 <= len(drawn) <= 3
        assert shapes_match(" ".join(drawn), caption), record["id"]
        assert re.findall(r"(\w+ (?:circle|square|triangle))", caption.lower()) == drawn, record["id"]


def test_follow_up_answers_are_true(shapes_dir):
    for record in _read(shapes_dir / "train.jsonl"):
        if len(record["messages"]) == 2:
            continue
        shapes = parse_shapes(record["messages"][1]["content"])
        question, answer = record["messages"][2]["content"], record["messages"][3]["content"]
        if question == "How many shapes are there?":
            assert answer == ("One.", "Two.", "Three.")[sum(shapes.values()) - 1]
        else:
            kind = question.removeprefix("What colour is the ").removesuffix("?")
            matching = [colour for (colour, k), n in shapes.items() for _ in range(n) if k == kind]
            assert matching == [answer.rstrip(".").lower()]


def test_caption_format():
    shape = make_shapes.Shape
    box = (0, 0, 11, 11)
    assert make_shapes.caption([shape("circle", "red", box)]) == "A red circle."
    assert (
        make_shapes.caption([shape("circle", "red", box), shape("square", "blue", box)])
        == "A red circle and a blue square."
    )
    assert (
        make_shapes.caption(
            [shape("circle", "red", box), shape("square", "blue", box), shape("triangle", "green", box)]
        )
        == "A red circle, a blue square and a green triangle."
    )


def test_bundled_set_is_present_and_small():
    bundled = ROOT / "data" / "shapes"
    train, test = _read(bundled / "train.jsonl"), _read(bundled / "test.jsonl")
    assert (len(train), len(test)) == (4000, 200)
    assert all((bundled / r["images"][0]).is_file() for r in train + test)
    assert sum(p.stat().st_size for p in bundled.rglob("*") if p.is_file()) < 3_000_000
