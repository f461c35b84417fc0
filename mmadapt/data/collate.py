"""Batch items of :class:`mmadapt.data.ConversationDataset` into padded tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence

from mmadapt.data.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class Collator:
    """Pad a list of items into a batch.

    The batch holds ``input_ids`` and ``attention_mask`` (``LongTensor[B, T]``),
    ``labels`` (``LongTensor[B, T]``, padded with ``IGNORE_INDEX``; training items
    only), ``references`` (generation items only), ``images``
    (``FloatTensor[N, 3, H, W]``, every item's images in order, so they match the
    image slots of ``input_ids`` read row by row; None when the batch has none),
    ``audio_features`` (``FloatTensor[M, mels, F]``, every speech item in slot order,
    zero-padded) with ``audio_frames`` (``LongTensor[M]``) when the batch has speech,
    and ``ids``. BLSP-KD items add ``teacher_input_ids``, ``teacher_attention_mask``,
    ``teacher_labels`` (padded like the student's) and ``speech_lengths``
    (``LongTensor[M]``, transcript token counts).

    Args:
        pad_token_id: id that fills padding; must be a text id (>= 0), since
            negative ids mark modality slots.
        padding_side: ``right`` for training, ``left`` for generation so every
            prompt ends at the last column.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        if self.pad_token_id < 0:
            raise ValueError(f"pad_token_id must be >= 0 (negative ids are modality slots), got {self.pad_token_id}")

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [item["input_ids"] for item in items]
        batch = {
            "ids": [item["id"] for item in items],
            "input_ids": self._pad(input_ids, self.pad_token_id),  # (B, T)
            "attention_mask": self._pad([torch.ones_like(ids) for ids in input_ids], 0),  # (B, T)
            "images": _concat_images([item["images"] for item in items]),
        }
        if "labels" in items[0]:
            batch["labels"] = self._pad([item["labels"] for item in items], IGNORE_INDEX)  # (B, T)
        if "reference" in items[0]:
            batch["references"] = [item["reference"] for item in items]
        batch.update(_audio_features([features for item in items for features in item.get("audios", [])]))
        if "teacher_input_ids" in items[0]:
            teacher = [item["teacher_input_ids"] for item in items]
            batch["teacher_input_ids"] = self._pad(teacher, self.pad_token_id)  # (B, T_t)
            batch["teacher_attention_mask"] = self._pad([torch.ones_like(ids) for ids in teacher], 0)
            batch["teacher_labels"] = self._pad([item["teacher_labels"] for item in items], IGNORE_INDEX)
            batch["speech_lengths"] = torch.tensor([item["speech_length"] for item in items])  # (M,)
        return batch

    def _pad(self, rows: list[torch.Tensor], value: int) -> torch.Tensor:
        return pad_sequence(rows, batch_first=True, padding_value=value, padding_side=self.padding_side)


def _concat_images(images: list[torch.Tensor]) -> torch.Tensor | None:
    present = [stack for stack in images if len(stack)]  # each (n_i, 3, H, W); items without images are skipped
    return torch.cat(present) if present else None  # (N, 3, H, W)


def _audio_features(features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    if not features:
        return {}
    frames = torch.tensor([f.shape[-1] for f in features])  # (M,)
    padded = pad_sequence([f.T for f in features], batch_first=True).transpose(1, 2)  # (M, mels, F)
    return {"audio_features": padded, "audio_frames": frames}
