"""Plain-text sets for model preparation: reading, packing into batches, perplexity.

A text set is a JSONL file with one ``{"id": ..., "text": ...}`` object per line
(``data/heldout_text/``). Held-out text is scored paragraph by paragraph; calibration
text is packed into equal-length sequences, paragraphs separated by the eos token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ..config import REPO_ROOT
from ..errors import BadRecord, InputError

HELDOUT = REPO_ROOT / "data" / "heldout_text" / "heldout.jsonl"
CALIBRATION = REPO_ROOT / "data" / "heldout_text" / "calibration.jsonl"


def read_texts(path: str | Path, what: str) -> list[str]:
    """The ``text`` of every record of a JSONL text set.

    Args:
        what: the command-line option that named the file, for error messages.

    Raises:
        InputError: the file is missing or empty, or a record is not an object with a
            non-empty string ``text``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: text file {path} does not exist")
    texts = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadRecord(str(path), line_number, None, f"not valid JSON: {error}") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            record_id = record.get("id") if isinstance(record, dict) else None
            raise BadRecord(str(path), line_number, record_id, "needs a non-empty string field 'text'")
        texts.append(text)
    if not texts:
        raise InputError(f"{what}: {path} holds no text records")
    return texts


def packed_batches(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int, batch_size: int, what: str
) -> list[torch.Tensor]:
    """Token ids of ``texts`` joined by eos and cut into ``(batch_size, seq_len)`` batches.

    The tail shorter than one sequence is dropped; the last batch may hold fewer rows.

    Raises:
        InputError: the texts hold fewer tokens than one sequence.
    """
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = len(stream) // seq_len
    if rows == 0:
        raise InputError(f"{what}: the text holds {len(stream)} tokens, fewer than one sequence of {seq_len}")
    sequences = torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)
    return list(sequences.split(batch_size))


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 8
) -> tuple[float, int]:
    """Token-level perplexity of ``model`` on ``texts``, each text scored on its own.

    Returns:
        ``(exp(mean next-token cross-entropy), number of predicted tokens)``.
    """
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(texts), batch_size), desc="perplexity", leave=False):
        encoded = tokenizer(
            texts[start : start + batch_size],
            add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt",
        )
        ids, mask = encoded["input_ids"], encoded["attention_mask"]  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_loss += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        total_tokens += int((targets != -100).sum())
    model.train(was_training)
    return math.exp(total_loss / total_tokens), total_tokens
