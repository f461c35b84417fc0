"""A torch dataset of tokenized conversations, built from a JSONL file.

Records are validated (``records.py``), put in a ``datasets`` table and tokenized
once with ``Dataset.map`` (``tokenize.py``); the table keeps the ids and labels.
Images are read and preprocessed only when an item is fetched, so DataLoader
workers share the work and memory holds file paths, not pixels.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mmadapt.data.config import DataConfig
from mmadapt.data.records import read_records
from mmadapt.data.audio import load_audio
from mmadapt.data.tokenize import encode_conversation, encode_distillation, encode_prompt
from mmadapt.errors import BadRecord, InputError

logger = logging.getLogger(__name__)

ImagePreprocess = Callable[[Image.Image], torch.Tensor]  # RGB image -> FloatTensor[3, H, W]
AudioPreprocess = Callable[[torch.Tensor], torch.Tensor]  # 16 kHz waveform -> FloatTensor[mels, frames]
DISTILLATION_KEYS = ("teacher_input_ids", "teacher_labels")


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenized conversations; items are dicts for :class:`mmadapt.data.Collator`.

    An item holds ``id``, ``input_ids`` (``LongTensor[T]``), ``images``
    (``FloatTensor[n, 3, H, W]``; ``[0, 3, 0, 0]`` without images), ``audios`` (a
    list of ``FloatTensor[mels, frames]``) and either ``labels`` (``LongTensor[T]``,
    training) or ``reference`` (the expected answer, generation). BLSP-KD items also
    hold ``teacher_input_ids``, ``teacher_labels`` and ``speech_length``.
    """

    def __init__(
        self,
        table: datasets.Dataset,
        preprocess_image: ImagePreprocess | None,
        preprocess_audio: AudioPreprocess | None = None,
        audio_cache_mb: int = 0,
    ) -> None:
        self.table = table
        self.preprocess_image = preprocess_image
        self.preprocess_audio = preprocess_audio
        self.audio_cache_bytes = audio_cache_mb * 2**20
        self._audio_cache: dict[str, torch.Tensor] = {}
        self._audio_cached_bytes = 0

    def __len__(self) -> int:
        return len(self.table)

    @functools.cached_property
    def lengths(self) -> list[int]:
        """Token count of every item (for length-grouped batching); read once, the table is fixed."""
        return [len(ids) for ids in self.table["input_ids"]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table[index]
        item = {
            "id": row["id"],
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "images": self._images(row["images"]),
            "audios": [self._audio(path) for path in row["audios"]],
        }
        if "labels" in row:
            item["labels"] = torch.tensor(row["labels"], dtype=torch.long)
        else:
            item["reference"] = row["reference"]
        for key in DISTILLATION_KEYS:
            if key in row:
                item[key] = torch.tensor(row[key], dtype=torch.long)
        if "speech_length" in row:
            item["speech_length"] = row["speech_length"]
        return item

    def _audio(self, path: str) -> torch.Tensor:
        """Log-mel features of one clip. Decoding (Opus) and the feature extractor cost ~13 ms
        a clip, ~10 % of a speech alignment step, every epoch; the first clips up to the
        budget stay in memory (no eviction: under shuffled access it would only churn)."""
        features = self._audio_cache.get(path)
        if features is None:
            features = self.preprocess_audio(load_audio(path))
            if self._audio_cached_bytes + features.nbytes <= self.audio_cache_bytes:
                self._audio_cache[path] = features
                self._audio_cached_bytes += features.nbytes
        return features

    def _images(self, paths: list[str]) -> torch.Tensor:
        if not paths:
            return torch.zeros(0, 3, 0, 0)
        tensors = []
        for path in paths:
            with Image.open(path) as image:
                tensors.append(self.preprocess_image(image.convert("RGB")))
        return torch.stack(tensors)  # (n, 3, H, W)


def build_dataset(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig,
    image_tokens: int,
    preprocess_image: ImagePreprocess | None,
    for_generation: bool = False,
    preprocess_audio: AudioPreprocess | None = None,
) -> tuple[ConversationDataset, Counter[str]]:
    """Read, validate and tokenize a JSONL file of conversations.

    When ``path`` is ``data_cfg.eval``, errors name ``data.eval`` and at most
    ``data_cfg.eval_samples`` records are used. Samples longer than
    ``data_cfg.max_length`` tokens are bad records, never truncated.

    Args:
        path: the JSONL file (``data_cfg.train``, ``data_cfg.eval`` or another).
        tokenizer: a tokenizer with a chat template.
        data_cfg: the ``data`` config section.
        image_tokens: slots per image (the vision encoder's token count; 0 without one).
        preprocess_image: turns an RGB image into ``FloatTensor[3, H, W]``; None
            without an image encoder.
        for_generation: encode each prompt (all messages before the final assistant
            message, then the assistant header) and keep that message's content as
            ``reference``, instead of the full conversation with labels.
        preprocess_audio: turns a 16 kHz waveform into log-mel features; None without a
            speech encoder. Transcript records (BLSP-KD) are encoded as student/teacher
            pairs with ``data_cfg.speech_prompt``.

    Returns:
        The dataset and how many records were skipped for each reason.

    Raises:
        InputError: the file is missing or holds no usable record, or has images
            but ``image_tokens`` is 0.
        BadRecord: a record is bad and ``data_cfg.on_bad_record`` is ``error``.
    """
    config_key = "data.eval" if str(path) == data_cfg.eval else "data.train"
    records, skipped = read_records(path, data_cfg.on_bad_record, config_key, data_cfg.max_audio_seconds)
    if config_key == "data.eval" and data_cfg.eval_samples is not None:
        records = records[: data_cfg.eval_samples]
    _check_encoders(records, config_key, image_tokens > 0, preprocess_audio is not None)
    distillation = _distillation_file(records, config_key, path)
    if distillation:
        encode = functools.partial(
            _encode_distillation,
            tokenizer=tokenizer,
            speech_prompt=data_cfg.speech_prompt,
            system_prompt=data_cfg.system_prompt,
        )
    else:
        encode = functools.partial(
            _encode_prompt if for_generation else _encode_conversation,
            tokenizer=tokenizer,
            image_tokens=image_tokens,
            system_prompt=data_cfg.system_prompt,
        )
    table = datasets.Dataset.from_list([asdict(record) for record in records])
    table = table.map(encode, remove_columns=["messages", "transcript"], desc=f"tokenizing {Path(path).name}")
    table, too_long = _drop_too_long(table, str(path), data_cfg)
    skipped["too long"] += too_long
    if len(table) == 0:
        raise InputError(f"{config_key}: {path} holds no usable record ({dict(+skipped)} skipped)")
    return ConversationDataset(table, preprocess_image, preprocess_audio, data_cfg.audio_cache_mb), +skipped


def _check_encoders(records: list, config_key: str, has_image_encoder: bool, has_speech_encoder: bool) -> None:
    for kind, present, files in (("image", has_image_encoder, "images"), ("speech", has_speech_encoder, "audios")):
        record = next((r for r in records if getattr(r, files)), None)
        if record is not None and not present:
            raise InputError(
                f"{config_key}: record {record.id!r} (line {record.line}) has {files} but the model has no {kind} encoder"
            )


def _distillation_file(records: list, config_key: str, path: str | Path) -> bool:
    """True when every record is a transcript record; a file mixing kinds is an error."""
    with_transcript = [r for r in records if r.transcript is not None]
    if with_transcript and len(with_transcript) != len(records):
        conversation = next(r for r in records if r.transcript is None)
        raise InputError(
            f"{config_key}: {path} mixes transcript records (BLSP-KD) with conversations "
            f"such as {conversation.id!r} (line {conversation.line}); use one kind per file"
        )
    return bool(with_transcript)


def _encode_conversation(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, image_tokens: int, system_prompt: str | None
) -> dict[str, list[int]]:
    return encode_conversation(tokenizer, row["messages"], image_tokens, system_prompt)


def _encode_distillation(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, speech_prompt: str, system_prompt: str | None
) -> dict[str, Any]:
    response = row["messages"][-1]["content"]
    return encode_distillation(tokenizer, row["transcript"], response, speech_prompt, system_prompt)


def _encode_prompt(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, image_tokens: int, system_prompt: str | None
) -> dict[str, Any]:
    *prompt, answer = row["messages"]  # records end with an assistant message
    input_ids = encode_prompt(tokenizer, prompt, image_tokens, system_prompt)
    return {"input_ids": input_ids, "reference": answer["content"]}


def _drop_too_long(table: datasets.Dataset, source: str, data_cfg: DataConfig) -> tuple[datasets.Dataset, int]:
    """Raise on, or drop, rows longer than ``data_cfg.max_length``; returns the table and the drop count."""
    lengths = [len(ids) for ids in table["input_ids"]]
    too_long = [index for index, length in enumerate(lengths) if length > data_cfg.max_length]
    for index in too_long:
        row = table[index]
        problem = f"{lengths[index]} tokens, longer than data.max_length={data_cfg.max_length}"
        bad = BadRecord(source, row["line"], row["id"], problem)
        if data_cfg.on_bad_record == "error":
            raise bad
        logger.warning("skipping record: %s", bad)
    if too_long:
        table = table.select(sorted(set(range(len(table))) - set(too_long)))
    return table, len(too_long)
