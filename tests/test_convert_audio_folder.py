import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mmadapt.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "convert_audio_folder.py"
_spec = importlib.util.spec_from_file_location("convert_audio_folder", SCRIPT)
convert_audio_folder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_audio_folder)
convert = convert_audio_folder.convert


def _write_audio(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tone = 0.3 * np.sin(np.linspace(0, 2 * np.pi * 44, 1600, dtype=np.float32))  # 0.1 s at 16 kHz
    soundfile.write(path, tone, 16000)
    return path


@pytest.fixture
def clips(tmp_path) -> Path:
    folder = tmp_path / "clips"
    for name in ("a.wav", "b.flac", "spk1/c.wav"):
        _write_audio(folder / name)
    return folder


def _resolve(out_dir: Path, record: dict) -> Path:
    return (out_dir / record["audios"][0]).resolve()


def test_tsv_list(clips, tmp_path):
    listing = tmp_path / "list.tsv"
    listing.write_text('file\ttranscript\nb.flac\t  Two  cats\n\nspk1/c.wav\tHe said "no".\na.wav\tA dog.\n')
    out_dir = tmp_path / "out" / "sub"
    rows = convert(clips, out_dir, listing)
    assert rows == [
        {"id": "b", "audios": ["../../clips/b.flac"], "transcript": "Two cats"},
        {"id": "spk1/c", "audios": ["../../clips/spk1/c.wav"], "transcript": 'He said "no".'},
        {"id": "a", "audios": ["../../clips/a.wav"], "transcript": "A dog."},
    ]
    assert [_resolve(out_dir, r) for r in rows] == [(clips / n).resolve() for n in ("b.flac", "spk1/c.wav", "a.wav")]


def test_csv_list_allows_quoted_commas(clips, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text('a.wav,"Yes, a dog."\nspk1/c.wav,No\n')
    rows = convert(clips, clips, listing)
    assert rows == [
        {"id": "a", "audios": ["a.wav"], "transcript": "Yes, a dog."},
        {"id": "spk1/c", "audios": ["spk1/c.wav"], "transcript": "No"},
    ]


def test_txt_beside_each_audio_file(clips, tmp_path):
    (clips / "a.txt").write_text("A dog\nruns.\n")
    (clips / "b.txt").write_text("Two cats.")
    (clips / "spk1" / "c.txt").write_text("Birds.")
    rows = convert(clips, tmp_path)
    assert rows == [
        {"id": "a", "audios": ["clips/a.wav"], "transcript": "A dog runs."},
        {"id": "b", "audios": ["clips/b.flac"], "transcript": "Two cats."},
        {"id": "spk1/c", "audios": ["clips/spk1/c.wav"], "transcript": "Birds."},
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.wav\tOne.\nmissing.wav\tTwo.\n", r"list.tsv:2: audio file 'missing.wav' not found"),
        ("a.wav\tOne.\nb.flac\t  \n", r"list.tsv:2: empty transcript for 'b.flac'"),
        ("a.wav\tOne.\nb.flac\tTwo.\n./a.wav\tThree.\n", r"list.tsv:3: './a.wav' is already listed on line 1"),
        ("a.wav\tOne.\tExtra\n", r"list.tsv:1: expected 2 columns \(file, transcript\), found 3"),
        ("a.wav\n", r"list.tsv:1: expected 2 columns \(file, transcript\), found 1"),
    ],
)
def test_bad_list_row_names_line(clips, tmp_path, text, message):
    listing = tmp_path / "list.tsv"
    listing.write_text(text)
    with pytest.raises(InputError, match=message):
        convert(clips, tmp_path, listing)


def test_same_id_from_two_files_is_refused(clips, tmp_path):
    _write_audio(clips / "a.flac")
    listing = tmp_path / "list.tsv"
    listing.write_text("a.wav\tOne.\na.flac\tTwo.\n")
    with pytest.raises(InputError, match=r"a.flac: id 'a' is also the id of .*a.wav"):
        convert(clips, tmp_path, listing)


def _txt_case(clips: Path, case: str) -> str:
    for stem in ("a", "b", "spk1/c"):
        (clips / f"{stem}.txt").write_text("Words.")
    if case == "no_txt":
        (clips / "b.txt").unlink()
        return r"b.flac: no transcript file b.txt beside it"
    if case == "empty_txt":
        (clips / "spk1" / "c.txt").write_text(" \n")
        return r"c.txt: empty transcript"
    if case == "orphan_txt":
        (clips / "notes.txt").write_text("Hello.")
        return r"notes.txt: transcript without an audio file"
    _write_audio(clips / "a.flac")  # case == "shared_txt"
    return r"a.txt: transcript of two audio files, a.flac and a.wav"


@pytest.mark.parametrize("case", ["no_txt", "empty_txt", "orphan_txt", "shared_txt"])
def test_bad_txt_names_file(clips, tmp_path, case):
    message = _txt_case(clips, case)
    with pytest.raises(InputError, match=message):
        convert(clips, tmp_path)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: not a folder"):
        convert(tmp_path / "nowhere", tmp_path)


def test_cli_writes_jsonl(clips, tmp_path):
    (clips / "list.tsv").write_text("a.wav\tOne.\nb.flac\tTwo.\n")
    out = tmp_path / "data" / "train.jsonl"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(clips), str(out), "--transcripts", str(clips / "list.tsv")], check=True
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"id": "a", "audios": ["../clips/a.wav"], "transcript": "One."},
        {"id": "b", "audios": ["../clips/b.flac"], "transcript": "Two."},
    ]


def test_cli_bad_input_exits_2_with_one_line(clips, tmp_path):
    (clips / "list.tsv").write_text("a.wav\tOne.\ngone.wav\tTwo.\n")
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(clips), str(out), "--transcripts", str(clips / "list.tsv")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "list.tsv:2: audio file 'gone.wav' not found" in result.stderr
    assert not out.exists()
