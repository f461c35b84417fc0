import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "convert_xcomposer.py"
_spec = importlib.util.spec_from_file_location("convert_xcomposer", SCRIPT)
convert_xcomposer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_xcomposer)
convert = convert_xcomposer.convert

SAMPLE = [
    {
        "id": "0",
        "image": ["imgs/a.jpg", "imgs/b.jpg"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<ImageHere> <ImageHere>What differs?"},
            {"from": "gpt", "value": "The colour."},
            {"from": "user", "value": "And now?"},
            {"from": "assistant", "value": "Nothing."},
        ],
    },
    {"id": 7, "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]},
]


def test_converts_roles_placeholders_and_paths(tmp_path):
    source, out = tmp_path / "src", tmp_path / "out" / "sub"
    rows = convert(SAMPLE, source, out)
    assert rows[0] == {
        "id": "0",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image> <image>What differs?"},
            {"role": "assistant", "content": "The colour."},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": "Nothing."},
        ],
        "images": ["../../src/imgs/a.jpg", "../../src/imgs/b.jpg"],
        "audios": [],
    }
    # Paths written relative to the output folder resolve to the source files.
    assert (out / rows[0]["images"][0]).resolve() == (source / "imgs/a.jpg").resolve()
    assert rows[1] == {
        "id": "7",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "images": [],
        "audios": [],
    }


def test_absolute_image_path_becomes_relative(tmp_path):
    record = {
        "id": "a",
        "image": [str(tmp_path / "x.png")],
        "conversations": [{"from": "user", "value": "<ImageHere>"}],
    }
    assert convert([record], "/elsewhere", tmp_path / "out")[0]["images"] == ["../x.png"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"id": "r1", "image": ["a.jpg"], "conversations": [{"from": "user", "value": "no placeholder"}]},
            r"record r1: 0 <ImageHere> placeholders but 1 images",
        ),
        (
            {"id": "r2", "conversations": [{"from": "user", "value": "<image> literal"}]},
            r"record r2: 1 <ImageHere> placeholders but 0 images",
        ),
        ({"id": "r3", "conversations": [{"from": "bot", "value": "x"}]}, r"record r3: unknown speaker 'bot'"),
        ({"id": "r4"}, r"record r4: 'conversations' must be a list"),
        ({"conversations": [{"from": "user"}]}, r"record 0: a turn's 'value' must be a string"),
    ],
)
def test_bad_record_names_it(tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        convert([record], tmp_path, tmp_path)


def test_cli_writes_jsonl(tmp_path):
    (tmp_path / "in.json").write_text(json.dumps(SAMPLE))
    out = tmp_path / "data" / "train.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "in.json"), str(out)], check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "7"]
    assert rows[0]["images"] == ["../imgs/a.jpg", "../imgs/b.jpg"]


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "in.json").write_text(json.dumps([{"id": "bad", "image": ["a.jpg"], "conversations": []}]))
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "in.json"), str(tmp_path / "out.jsonl")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "record bad" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
