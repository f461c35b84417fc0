"""Batch inference: answer a JSONL file of requests with a trained run, resumably.

::

    model, cfg = load_run("OUT")
    requests = read_requests("requests.jsonl", model, cfg.data, name="OUT")
    answered = resume_output("answers.jsonl")
    answer_requests(model, [r for r in requests if r.id not in answered], "answers.jsonl", batch_size=8)

A request is a record of the training schema (``mmadapt.data.records``: ids, files
relative to the JSONL's folder, one placeholder per file). Its prompt is

- a conversation ending with an assistant message: every message before that one (so
  training and eval files work as they are; the final answer is ignored);
- a conversation ending with a user message: the whole conversation;
- a BLSP-KD transcript record: the run's ``data.speech_prompt`` with the audio in the
  transcript's place, the prompt the speech student was trained on.

Requests are answered in file order, ``batch_size`` at a time; a batch may mix image,
speech and text-only prompts (left-padded, decoded together). After each batch its
answers are appended to the output, one flushed ``{"id", "answer", "tokens"}`` line each,
so a killed run loses at most the batch in flight; a rerun skips the ids already
answered, after cutting off a half-written last line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mmadapt.data.config import DataConfig
from mmadapt.data.records import Record, read_records
from mmadapt.data.tokenize import IGNORE_INDEX, encode_distillation, encode_prompt
from mmadapt.errors import BadRecord, InputError
from mmadapt.inference.prompts import answer_tokens, decode, load_audio_features, load_image, prompt_item
from mmadapt.model import MultimodalLM


@dataclass
class Request:
    """A validated request: its prompt ids (modality slots included) and resolved file paths."""

    id: str
    input_ids: list[int]
    images: list[str]
    audios: list[str]


def read_requests(path: str | Path, model: MultimodalLM, data_cfg: DataConfig, name: str = "the model") -> list[Request]:
    """Read, validate and tokenize every request of a JSONL file, before anything is generated.

    Args:
        path: the requests file.
        model: the model that answers (its tokenizer and encoders).
        data_cfg: the run's ``data`` section (system and speech prompts, longest audio).
        name: what error messages call the model, e.g. its run folder.

    Raises:
        BadRecord: a request is malformed, has no or a duplicate id, names a missing or
            unreadable file, or has files for an encoder the model lacks (names file, line, id).
        InputError: the file is missing or holds no request.
    """
    records, _ = read_records(path, "error", "--input", data_cfg.max_audio_seconds, open_ended=True)
    image_tokens = model.encoders["image"].num_tokens if "image" in model.encoders else 0
    requests = []
    for record in records:
        for files, kind in (("images", "image"), ("audios", "speech")):
            if getattr(record, files) and kind not in model.encoders:
                raise BadRecord(str(path), record.line, record.id, f"has {files} but {name} has no {kind} encoder")
        input_ids = _prompt_ids(model.tokenizer, record, image_tokens, data_cfg)
        requests.append(Request(record.id, input_ids, record.images, record.audios))
    return requests


def _prompt_ids(tokenizer, record: Record, image_tokens: int, data_cfg: DataConfig) -> list[int]:
    if record.transcript is not None:
        # The student's sequence up to its first labelled token: the prompt, assistant header included.
        encoded = encode_distillation(tokenizer, record.transcript, "-", data_cfg.speech_prompt, data_cfg.system_prompt)
        first_answer = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
        return encoded["input_ids"][:first_answer]
    messages = record.messages[:-1] if record.messages[-1]["role"] == "assistant" else record.messages
    return encode_prompt(tokenizer, messages, image_tokens, data_cfg.system_prompt)


def resume_output(path: str | Path) -> set[str]:
    """Ready an output file for appending: cut a half-written last line; return the answered ids.

    Raises:
        InputError: a complete line is not an answer row (not the output of ``mmadapt infer``).
    """
    path = Path(path)
    if not path.exists():
        return set()
    content = path.read_bytes()
    complete = content[: content.rfind(b"\n") + 1]  # a killed run may leave a line without its newline
    if len(complete) < len(content):
        with path.open("r+b") as output:
            output.truncate(len(complete))
    answered = set()
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            answered.add(_answered_id(line, path, number))
    return answered


def _answered_id(line: str, path: Path, number: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        raise InputError(f"{path}:{number}: not an answer row with an 'id'; is this the output of mmadapt infer?")
    return row["id"]


def answer_requests(
    model: MultimodalLM,
    requests: list[Request],
    output: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    progress: bool = True,
) -> int:
    """Answer ``requests`` in batches, appending one flushed JSON line per answer to ``output``.

    Args:
        model: the model, in eval mode.
        requests: from :func:`read_requests`, already-answered ones left out.
        output: the answers file (created, or appended to).
        batch_size: prompts decoded together.
        max_new_tokens: longest answer in tokens.
        do_sample: sample at ``temperature`` instead of greedy decoding.
        temperature: softmax temperature when sampling.
        progress: show a progress bar on stderr.

    Returns:
        How many answer tokens were generated (end-of-turn excluded).
    """
    settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    generated = 0
    bar = tqdm(total=len(requests), desc="infer", unit="request", disable=not progress)
    with open(output, "a", encoding="utf-8") as sink, bar:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            answers = answer_tokens(model, [_item(model, request) for request in chunk], **settings)
            for request, tokens in zip(chunk, answers):
                row = {"id": request.id, "answer": decode(model.tokenizer, tokens), "tokens": len(tokens)}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
                generated += len(tokens)
            bar.update(len(chunk))
    return generated


def _item(model: MultimodalLM, request: Request) -> dict:
    images = [load_image(model, path) for path in request.images]
    audios = [load_audio_features(model, path) for path in request.audios]
    return prompt_item(request.id, request.input_ids, images, audios)
