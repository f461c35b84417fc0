"""Read conversation records from a JSONL file and validate each one.

A record is one line::

    {"id": "s1", "messages": [{"role": "user", "content": "<image>\\nDescribe it."},
                              {"role": "assistant", "content": "A red circle."}],
     "images": ["images/s1.png"], "audios": []}

or, for BLSP-KD speech distillation, one audio file with its transcript and the
teacher's continuation (the prompt around them comes from ``data.speech_prompt``)::

    {"id": "u1", "audios": ["audio/u1.flac"], "transcript": "the red cat", "response": "sat on the mat."}

File paths are relative to the JSONL file's folder. A bad record raises
:class:`BadRecord` naming the file, line and id, or, with ``on_bad_record="skip"``,
is logged, counted by reason and dropped. Keys a record has beyond these are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mmadapt.data.audio import AudioError, load_audio
from mmadapt.errors import BadRecord, InputError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Which list of files each placeholder counts against.
PLACEHOLDERS = {"images": "<image>", "audios": "<speech>"}


@dataclass
class Record:
    """A validated conversation; ``images``/``audios`` hold resolved file paths.

    A BLSP-KD record has a ``transcript`` and a single assistant message (the response).
    """

    id: str
    line: int
    messages: list[dict[str, str]]
    images: list[str]
    audios: list[str]
    transcript: str | None = None


class _Invalid(Exception):
    """One problem with a record: ``reason`` keys the skip counter, the message explains."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.reason = reason


def read_records(
    path: str | Path,
    on_bad_record: Literal["error", "skip"] = "error",
    config_key: str = "data.train",
    max_audio_seconds: float | None = None,
    open_ended: bool = False,
) -> tuple[list[Record], Counter[str]]:
    """Read and validate every record of a JSONL file; blank lines are ignored.

    Args:
        path: the JSONL file.
        on_bad_record: ``error`` raises at the first bad record, ``skip`` drops it.
        config_key: the config key that named ``path``, for the missing-file error.
        max_audio_seconds: longer audio files make a record bad.
        open_ended: requests to answer (``mmadapt infer``): a conversation may also end
            with a user message.

    Returns:
        The valid records in file order, and how many were skipped for each reason.

    Raises:
        InputError: the file is missing or holds no usable record.
        BadRecord: a record is bad and ``on_bad_record`` is ``error``.
    """
    source = Path(path)
    if not source.is_file():
        raise InputError(f"{config_key}: no such file: {source}")
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    seen_ids: set[str] = set()
    with source.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            record_id = None
            try:
                data = _json_object(text)
                record_id = _record_id(data)
                _check_unique(record_id, seen_ids)
                records.append(_validated(data, record_id, number, source.parent, max_audio_seconds, open_ended))
            except _Invalid as invalid:
                bad = BadRecord(str(source), number, record_id, str(invalid))
                if on_bad_record == "error":
                    raise bad from None
                logger.warning("skipping record: %s", bad)
                skipped[invalid.reason] += 1
    if not records:
        detail = f" ({sum(skipped.values())} bad records skipped: {dict(skipped)})" if skipped else ""
        raise InputError(f"{config_key}: {source} holds no usable record{detail}")
    return records, skipped


def _json_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _Invalid("invalid JSON", f"not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise _Invalid("invalid JSON", f"a record must be a JSON object, got {type(data).__name__}")
    return data


def _record_id(data: dict[str, Any]) -> str:
    record_id = data.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise _Invalid("invalid schema", f"'id' must be a non-empty string, got {record_id!r}")
    return record_id


def _check_unique(record_id: str, seen_ids: set[str]) -> None:
    if record_id in seen_ids:
        raise _Invalid("duplicate id", f"id {record_id!r} appears earlier in the file")
    seen_ids.add(record_id)


def _validated(
    data: dict[str, Any], record_id: str, line: int, folder: Path, max_audio_seconds: float | None, open_ended: bool
) -> Record:
    if "transcript" in data:
        return _speech_record(data, record_id, line, folder, max_audio_seconds)
    messages = _messages(data.get("messages"), open_ended)
    files = {key: _string_list(data, key) for key in PLACEHOLDERS}
    for key, placeholder in PLACEHOLDERS.items():
        count = sum(message["content"].count(placeholder) for message in messages)
        if count != len(files[key]):
            raise _Invalid(
                "placeholder mismatch",
                f"{count} {placeholder} placeholder(s) in the messages but {len(files[key])} file(s) in '{key}'",
            )
    images = [_readable_image(folder, name) for name in files["images"]]
    audios = [_readable_audio(folder, name, max_audio_seconds) for name in files["audios"]]
    return Record(record_id, line, messages, images, audios)


def _speech_record(data: dict[str, Any], record_id: str, line: int, folder: Path, max_audio_seconds: float | None) -> Record:
    transcript, response = data.get("transcript"), data.get("response")
    if not isinstance(transcript, str) or not transcript.strip():
        raise _Invalid("empty transcript", f"'transcript' must be a non-empty string, got {transcript!r}")
    if not isinstance(response, str) or not response.strip():
        raise _Invalid(
            "missing response",
            f"'response' (the teacher's continuation) must be a non-empty string, got {response!r}; "
            "write it with data/make_responses.py",
        )
    audios = _string_list(data, "audios")
    if len(audios) != 1:
        raise _Invalid("placeholder mismatch", f"a transcript record needs exactly one file in 'audios', got {len(audios)}")
    audio = _readable_audio(folder, audios[0], max_audio_seconds)
    messages = [{"role": "assistant", "content": response}]
    return Record(record_id, line, messages, [], [audio], transcript.strip())


def _messages(value: Any, open_ended: bool) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Invalid("invalid schema", "'messages' must be a non-empty list")
    messages = []
    for index, message in enumerate(value):
        well_formed = isinstance(message, dict) and message.get("role") in ROLES
        if not well_formed or not isinstance(message.get("content"), str):
            raise _Invalid(
                "invalid schema",
                f"messages[{index}] must be {{'role': one of {list(ROLES)}, 'content': a string}}, got {message!r}",
            )
        messages.append({"role": message["role"], "content": message["content"]})
    # The final assistant message is what the model learns to write, or for eval the reference
    # answer to the prompt before it; a request may instead end with the user turn to answer.
    if open_ended and messages[-1]["role"] == "user":
        return messages
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        allowed = "an assistant answer to at least one message" + (" or a user turn" if open_ended else "")
        raise _Invalid("invalid schema", f"the last message must be {allowed}")
    return messages


def _string_list(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Invalid("invalid schema", f"'{key}' must be a list of file paths, got {value!r}")
    return value


def _existing_file(folder: Path, name: str, kind: str) -> str:
    path = folder / name
    if not path.is_file():
        raise _Invalid("missing file", f"{kind} {name} not found (looked for {path})")
    return str(path)


def _readable_audio(folder: Path, name: str, max_seconds: float | None) -> str:
    path = _existing_file(folder, name, "audio")
    try:
        load_audio(path, max_seconds)
    except AudioError as error:
        raise _Invalid(error.reason.replace("_", " "), str(error)) from None
    return path


def _readable_image(folder: Path, name: str) -> str:
    path = _existing_file(folder, name, "image")
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _Invalid("unreadable image", f"image {name} is not a readable image: {error}") from None
    return path


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write one JSON object per line, through a temporary file, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(temporary, path)
