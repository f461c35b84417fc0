import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmadapt.data.records import read_records
from mmadapt.errors import BadRecord, InputError


def record(record_id: str, content: str = "<image>\nWhat is it?", images=("images/ok.png",), **extra) -> dict:
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "A red square."}]
    return {"id": record_id, "messages": messages, "images": list(images), "audios": [], **extra}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    sf.write(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 3, dtype=np.float32), 16000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF")
    return tmp_path


def write(folder: Path, *lines) -> Path:
    path = folder / "data.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_reads_valid_records_with_paths_relative_to_the_file(folder, tmp_path_factory, monkeypatch):
    path = write(folder, record("a"), "", record("b", extra_key=1), record("c", "no image", images=()))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    records, skipped = read_records(path)
    assert [(r.id, r.line) for r in records] == [("a", 1), ("b", 3), ("c", 4)]
    assert records[0].images == [str(folder / "images" / "ok.png")]
    assert records[2].images == []
    assert records[0].messages[1] == {"role": "assistant", "content": "A red square."}
    assert not skipped


def speech_record(record_id: str, audio: str = "a.wav") -> dict:
    return {"id": record_id, "audios": [audio], "transcript": "the red cat", "response": "sat on the mat."}


BAD_CASES = {
    "missing image": (record("x", images=["images/nope.png"]), "x", "image images/nope.png not found"),
    "corrupt image": (record("x", images=["images/bad.png"]), "x", "image images/bad.png is not a readable image"),
    "placeholder mismatch": (record("x", "<image> and <image>"), "x", "2 <image> placeholder(s) in the messages"),
    "speech mismatch": (record("x", "<image><speech>"), "x", "1 <speech> placeholder(s) in the messages but 0"),
    "missing audio": (record("x", "<image><speech>", audios=["b.wav"]), "x", "audio b.wav not found"),
    "unreadable audio": (record("x", "<image><speech>", audios=["bad.wav"]), "x", "not a readable audio file"),
    "transcript without response": (
        {"id": "x", "audios": ["a.wav"], "transcript": "the cat"}, "x", "'response' (the teacher's continuation)"
    ),
    "empty transcript": ({**speech_record("x"), "transcript": "  "}, "x", "'transcript' must be a non-empty string"),
    "two audios for a transcript": ({**speech_record("x"), "audios": ["a.wav", "a.wav"]}, "x", "exactly one file"),
    "bad JSON line": ('{"id": "x", "messages": [', None, "not valid JSON"),
    "not an object": ("[1, 2]", None, "must be a JSON object"),
    "duplicate id": (record("a"), "a", "id 'a' appears earlier"),
    "empty id": (record(""), None, "'id' must be a non-empty string"),
    "bad role": ({**record("x"), "messages": [{"role": "bot", "content": "hi"}]}, "x", "messages[0] must be"),
    "answer only": ({**record("x", images=()), "messages": [{"role": "assistant", "content": "!"}]}, "x", "answer to"),
    "no messages": ({**record("x"), "messages": []}, "x", "'messages' must be a non-empty list"),
    "ends with user": ({**record("x", images=()), "messages": [{"role": "user", "content": "?"}]}, "x", "last message"),
    "images not a list": ({**record("x"), "images": "images/ok.png"}, "x", "'images' must be a list"),
}


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_record_names_file_line_and_id(folder, case):
    bad, record_id, problem = BAD_CASES[case]
    path = write(folder, record("a"), "", bad, record("z"))
    with pytest.raises(BadRecord) as caught:
        read_records(path)
    error = caught.value
    assert (error.source, error.line, error.record_id) == (str(path), 3, record_id)
    assert problem in error.problem
    assert str(error).startswith(f"{path}:3 (id={record_id!r}): ")


def test_skip_mode_counts_bad_records_by_reason(folder):
    bad_cases = [
        record("b", images=["images/nope.png"]),
        record("c", "<image><speech>", audios=["b.wav"]),
        record("d", images=["images/bad.png"]),
        "{not json",
        record("a"),
        record("e", "<image><speech>", audios=["a.wav"]),
        speech_record("f", "bad.wav"),
        speech_record("g", "long.wav"),
    ]
    path = write(folder, record("a"), *bad_cases, record("z"))
    records, skipped = read_records(path, on_bad_record="skip", max_audio_seconds=2.0)
    assert [r.id for r in records] == ["a", "e", "z"]
    assert records[1].audios == [str(folder / "a.wav")]
    assert skipped == {
        "missing file": 2, "unreadable image": 1, "invalid JSON": 1, "duplicate id": 1,
        "unreadable audio": 1, "audio too long": 1,
    }


def test_speech_record_becomes_transcript_and_response(folder):
    path = write(folder, speech_record("u1"))
    [parsed], _ = read_records(path)
    assert parsed.transcript == "the red cat"
    assert parsed.audios == [str(folder / "a.wav")]
    assert parsed.messages == [{"role": "assistant", "content": "sat on the mat."}]


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
def test_empty_file_is_an_input_error_naming_the_file(folder, on_bad_record):
    path = write(folder, "", "  ")
    with pytest.raises(InputError, match=f"data.train: {path} holds no usable record"):
        read_records(path, on_bad_record)


def test_file_with_only_bad_records_in_skip_mode_is_an_input_error(folder):
    path = write(folder, "not json", record("x", images=["images/nope.png"]))
    with pytest.raises(InputError, match=r"no usable record \(2 bad records skipped"):
        read_records(path, "skip")


def test_missing_file_names_the_config_key(folder):
    with pytest.raises(InputError, match=f"data.eval: no such file: {folder / 'nope.jsonl'}"):
        read_records(folder / "nope.jsonl", config_key="data.eval")
