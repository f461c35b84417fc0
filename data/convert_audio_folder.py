"""Converts a folder of audio files with transcripts to mmadapt speech JSONL.

    python data/convert_audio_folder.py clips/ data/mine/train.jsonl --transcripts clips/list.tsv
    python data/convert_audio_folder.py clips/ data/mine/train.jsonl     # clips/a.wav + clips/a.txt

Transcripts come either from a list (``--transcripts``: one ``file<TAB>transcript``
row per clip, or ``file,transcript`` when the list ends in ``.csv``; file names are
relative to the audio folder; an optional ``file``/``transcript`` header row is
skipped) or from one ``.txt`` per audio file with the same name stem beside it.
Each record is ``{"id", "audios", "transcript"}`` (the BLSP-KD schema before the
teacher's ``response`` is added); the id is the audio path relative to the folder
without its extension, and audio paths are written relative to the output file's
folder, as data/README.md requires.
"""

import argparse
import csv
import os
import sys
from pathlib import Path

from mmadapt.data.records import write_jsonl
from mmadapt.errors import InputError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3")
HEADER = ("file", "transcript")


def _clean(text: str) -> str:
    return " ".join(text.split())  # one line, single spaces


def read_transcript_list(path: Path, audio_dir: Path) -> list[tuple[Path, str]]:
    """Reads ``file<TAB>transcript`` rows (comma-separated when ``path`` ends in .csv).

    Args:
        path: The transcript list.
        audio_dir: Folder the listed file names are relative to.

    Returns:
        ``(audio file, transcript)`` pairs in list order; blank rows are skipped.

    Raises:
        InputError: Naming the list and line of a row without two columns, a missing
            audio file, an empty transcript or a file listed twice.
    """
    # CSV may quote a transcript holding commas; in TSV a quote is just a character.
    dialect = {"delimiter": ","} if path.suffix.lower() == ".csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    pairs, seen = [], {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, **dialect)
        for index, row in enumerate(reader):
            line = reader.line_num
            if not row or (index == 0 and tuple(cell.strip().lower() for cell in row) == HEADER):
                continue
            where = f"{path}:{line}"
            if len(row) != 2:
                raise InputError(f"{where}: expected 2 columns (file, transcript), found {len(row)}")
            name, transcript = row[0].strip(), _clean(row[1])
            audio = (audio_dir / name).resolve()
            if not audio.is_file():
                raise InputError(f"{where}: audio file {name!r} not found in {audio_dir}")
            if not transcript:
                raise InputError(f"{where}: empty transcript for {name!r}")
            if audio in seen:
                raise InputError(f"{where}: {name!r} is already listed on line {seen[audio]}")
            seen[audio] = line
            pairs.append((audio, transcript))
    return pairs


def read_transcript_files(audio_dir: Path) -> list[tuple[Path, str]]:
    """Pairs every audio file under ``audio_dir`` with the ``.txt`` of the same stem beside it.

    Args:
        audio_dir: Folder searched recursively for audio files and ``.txt`` transcripts.

    Returns:
        ``(audio file, transcript)`` pairs sorted by path.

    Raises:
        InputError: Naming the file when an audio file has no transcript, a transcript
            is empty or has no audio file, or two audio files share one transcript.
    """
    audios = sorted(p for p in audio_dir.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    texts = {p.with_suffix(""): p for p in audio_dir.rglob("*.txt")}
    pairs, owners = [], {}
    for audio in audios:
        stem = audio.with_suffix("")
        if stem not in texts:
            raise InputError(f"{audio}: no transcript file {stem.name}.txt beside it")
        if stem in owners:
            raise InputError(f"{texts[stem]}: transcript of two audio files, {owners[stem].name} and {audio.name}")
        owners[stem] = audio
        transcript = _clean(texts[stem].read_text(encoding="utf-8"))
        if not transcript:
            raise InputError(f"{texts[stem]}: empty transcript")
        pairs.append((audio.resolve(), transcript))
    for stem, text in sorted(texts.items()):
        if stem not in owners:
            raise InputError(f"{text}: transcript without an audio file ({', '.join(AUDIO_EXTENSIONS)})")
    return pairs


def convert(audio_dir: str | Path, out_dir: str | Path, transcripts: str | Path | None = None) -> list[dict]:
    """Builds one speech record per audio file.

    Args:
        audio_dir: Folder holding the audio files.
        out_dir: Folder of the JSONL file the records will be written to.
        transcripts: A ``file<TAB>transcript`` list (``.csv``: comma-separated); None
            reads one ``.txt`` per audio file instead.

    Returns:
        ``{"id", "audios": [path relative to out_dir], "transcript"}`` records.

    Raises:
        InputError: Naming the file (and line) of a missing audio file, an empty or
            missing transcript, or a duplicate file or id.
    """
    audio_dir = Path(audio_dir).resolve()
    if not audio_dir.is_dir():
        raise InputError(f"{audio_dir}: not a folder")
    if transcripts is None:
        pairs = read_transcript_files(audio_dir)
    else:
        pairs = read_transcript_list(Path(transcripts), audio_dir)
    out_dir, records, ids = Path(out_dir).resolve(), [], {}
    for audio, transcript in pairs:
        # Files outside audio_dir (a list may name "../x.wav") are named by their full path.
        record_id = (audio.relative_to(audio_dir) if audio.is_relative_to(audio_dir) else audio).with_suffix("")
        record_id = record_id.as_posix()
        if record_id in ids:
            raise InputError(f"{audio}: id {record_id!r} is also the id of {ids[record_id]}")
        ids[record_id] = audio
        path = Path(os.path.relpath(audio, out_dir)).as_posix()
        records.append({"id": record_id, "audios": [path], "transcript": transcript})
    return records


def main() -> None:
    """Converts the folder and writes JSONL; bad input exits with code 2 and one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio_dir", type=Path, help="folder of audio files")
    parser.add_argument("output", type=Path, help="JSONL file to write")
    parser.add_argument(
        "--transcripts", type=Path, help="file<TAB>transcript list (.csv: comma); default: one .txt per audio file"
    )
    args = parser.parse_args()
    try:
        rows = convert(args.audio_dir, args.output.parent, args.transcripts)
    except (OSError, UnicodeDecodeError, InputError) as error:
        print(f"convert_audio_folder.py: {error}", file=sys.stderr)
        sys.exit(2)
    write_jsonl(args.output, rows)


if __name__ == "__main__":
    main()
