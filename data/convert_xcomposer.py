"""Converts InternLM-XComposer2 fine-tuning JSON to mmadapt JSONL.

    python data/convert_xcomposer.py vl_data.json data/vl/train.jsonl

The input is a JSON list of ``{"id", "image": [paths], "conversations": [{"from",
"value"}]}`` with one ``<ImageHere>`` per image (``image`` may be absent for text-only
samples). Relative image paths are read against the input file's folder and
written relative to the output file's folder, as data/README.md requires.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from mmadapt.data.records import write_jsonl

SOURCE_PLACEHOLDER = "<ImageHere>"
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def _image_path(path: str, source_dir: Path, out_dir: Path) -> str:
    resolved = (source_dir / path).resolve()
    return Path(os.path.relpath(resolved, out_dir.resolve())).as_posix()


def _message(turn: dict, record_id: str) -> dict:
    role, value = ROLES.get(turn.get("from")), turn.get("value")
    if role is None:
        raise ValueError(
            f"record {record_id}: unknown speaker {turn.get('from')!r}; expected one of {', '.join(ROLES)}"
        )
    if not isinstance(value, str):
        raise ValueError(f"record {record_id}: a turn's 'value' must be a string")
    return {"role": role, "content": value.replace(SOURCE_PLACEHOLDER, IMAGE_PLACEHOLDER)}


def convert_record(record: dict, source_dir: Path, out_dir: Path) -> dict:
    """Converts one XComposer2 sample.

    Args:
        record: ``{"id", "image", "conversations"}`` as in XComposer2's fine-tuning data.
        source_dir: Folder the record's relative image paths are relative to.
        out_dir: Folder of the JSONL file the result goes into.

    Returns:
        ``{"id", "messages", "images", "audios"}``.

    Raises:
        ValueError: Naming the record when it is malformed, a speaker is unknown or
            the number of placeholders differs from the number of images.
    """
    record_id = str(record.get("id"))
    images = record.get("image", [])
    if isinstance(images, str):
        images = [images]
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"record {record_id}: 'conversations' must be a list of {{from, value}} objects")
    messages = [_message(turn, record_id) for turn in turns]
    # Counted after the rewrite so a literal "<image>" already in the text is caught too.
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(images):
        raise ValueError(
            f"record {record_id}: {placeholders} {SOURCE_PLACEHOLDER} placeholders but {len(images)} images"
        )
    return {
        "id": record_id,
        "messages": messages,
        "images": [_image_path(p, source_dir, out_dir) for p in images],
        "audios": [],
    }


def convert(records: list[dict], source_dir: str | Path, out_dir: str | Path) -> list[dict]:
    """Converts a list of XComposer2 samples to mmadapt records.

    Args:
        records: The parsed XComposer2 JSON list.
        source_dir: Folder the input's relative image paths are relative to.
        out_dir: Folder of the JSONL file the records will be written to.

    Returns:
        One mmadapt record per input sample, in order.

    Raises:
        ValueError: Naming the first bad record (see ``convert_record``).
    """
    # A record without an id is named by its position, in errors and in the output.
    return [convert_record({"id": i, **r}, Path(source_dir), Path(out_dir)) for i, r in enumerate(records)]


def main() -> None:
    """Reads the input JSON, converts it and writes JSONL; bad input exits with code 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="XComposer2 fine-tuning JSON file")
    parser.add_argument("output", type=Path, help="JSONL file to write")
    args = parser.parse_args()
    try:
        records = json.loads(args.input.read_text(encoding="utf-8"))
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("expected a JSON list of objects")
        rows = convert(records, args.input.parent, args.output.parent)
    except (OSError, ValueError) as error:
        print(f"{args.input}: {error}", file=sys.stderr)
        sys.exit(2)
    write_jsonl(args.output, rows)


if __name__ == "__main__":
    main()
