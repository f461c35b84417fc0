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
from mmadapt.data.tokenize import encode_conversation, encode_prompt
from mmadapt.errors import BadRecord, InputError

logger = logging.getLogger(__name__)

ImagePreprocess = Callable[[Image.Image], torch.Tensor]  # RGB image -> FloatTensor[3, H, W]


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenized conversations; items are dicts for :class:`mmadapt.data.Collator`.

    An item holds ``id``, ``input_ids`` (``LongTensor[T]``), ``images``
    (``FloatTensor[n, 3, H, W]``; ``[0, 3, 0, 0]`` without images) and either
    ``labels`` (``LongTensor[T]``, training) or ``reference`` (the expected answer,
    generation).
    """

    def __init__(self, table: datasets.Dataset, preprocess_image: ImagePreprocess | None) -> None:
        self.table = table
        self.preprocess_image = preprocess_image

    def __len__(self) -> int:
        return len(self.table)

    @property
    def lengths(self) -> list[int]:
        """Token count of every item (for length-grouped batching)."""
        return [len(ids) for ids in self.table["input_ids"]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table[index]
        item = {
            "id": row["id"],
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "images": self._images(row["images"]),
        }
        if "labels" in row:
            item["labels"] = torch.tensor(row["labels"], dtype=torch.long)
        else:
            item["reference"] = row["reference"]
        return item

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

    Returns:
        The dataset and how many records were skipped for each reason.

    Raises:
        InputError: the file is missing or holds no usable record, or has images
            but ``image_tokens`` is 0.
        BadRecord: a record is bad and ``data_cfg.on_bad_record`` is ``error``.
    """
    config_key = "data.eval" if str(path) == data_cfg.eval else "data.train"
    records, skipped = read_records(path, data_cfg.on_bad_record, config_key)
    if config_key == "data.eval" and data_cfg.eval_samples is not None:
        records = records[: data_cfg.eval_samples]
    with_images = next((record for record in records if record.images), None)
    if image_tokens < 1 and with_images:
        raise InputError(
            f"{config_key}: record {with_images.id!r} (line {with_images.line}) has images "
            "but the model has no image encoder"
        )
    encode = functools.partial(
        _encode_prompt if for_generation else _encode_conversation,
        tokenizer=tokenizer,
        image_tokens=image_tokens,
        system_prompt=data_cfg.system_prompt,
    )
    table = datasets.Dataset.from_list([asdict(record) for record in records])
    table = table.map(encode, remove_columns=["messages", "audios"], desc=f"tokenizing {Path(path).name}")
    table, too_long = _drop_too_long(table, str(path), data_cfg)
    skipped["too long"] += too_long
    if len(table) == 0:
        raise InputError(f"{config_key}: {path} holds no usable record ({dict(+skipped)} skipped)")
    return ConversationDataset(table, preprocess_image), +skipped


def _encode_conversation(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, image_tokens: int, system_prompt: str | None
) -> dict[str, list[int]]:
    return encode_conversation(tokenizer, row["messages"], image_tokens, system_prompt)


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
