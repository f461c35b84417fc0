"""Conversation data: JSONL records -> validated records -> token ids with labels -> batches.

    records, skipped = read_records("train.jsonl")          # records.py: schema, files, placeholders
    ids = encode_conversation(tokenizer, messages, 16)        # tokenize.py: chat template, labels, slots
    dataset, skipped = build_dataset(path, tokenizer, cfg, 16, preprocess)   # dataset.py
    loader = DataLoader(dataset, batch_size=8, collate_fn=Collator(pad_id))  # collate.py
"""

from mmadapt.data.collate import Collator
from mmadapt.data.config import DataConfig
from mmadapt.data.dataset import ConversationDataset, build_dataset
from mmadapt.data.records import Record, read_records
from mmadapt.data.tokenize import IGNORE_INDEX, IMAGE_SLOT, SPEECH_SLOT, encode_conversation, encode_prompt

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_SLOT",
    "SPEECH_SLOT",
    "Collator",
    "ConversationDataset",
    "DataConfig",
    "Record",
    "build_dataset",
    "encode_conversation",
    "encode_prompt",
    "read_records",
]
