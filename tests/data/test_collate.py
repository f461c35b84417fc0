import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmadapt.data import IGNORE_INDEX, IMAGE_SLOT, Collator, DataConfig, build_dataset
from mmadapt.errors import BadRecord, InputError
from mmadapt.tokenizers import byte_tokenizer

IMAGE_TOKENS = 2
PAD = 2  # <|im_end|>, the byte tokenizer's pad


def preprocess(image: Image.Image) -> torch.Tensor:
    """A (3, 2, 2) tensor filled with the image's red value, so tests can tell images apart."""
    return torch.full((3, 2, 2), float(image.getpixel((0, 0))[0]))


def conversation(record_id: str, images: list[str], question: str, answer: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": record_id, "messages": messages, "images": images}


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    for red in (10, 20, 30):
        Image.new("RGB", (4, 4), (red, 0, 0)).save(tmp_path / f"{red}.png")
    records = [
        conversation("two", ["10.png", "20.png"], "<image> vs <image>?", "The left one is darker."),
        conversation("none", [], "Hi", "Hello."),
        conversation("one", ["30.png"], "<image>", "Red."),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build(path: Path, for_generation: bool = False, **data):
    cfg = DataConfig(train=str(path), **data)
    return build_dataset(path, byte_tokenizer(), cfg, IMAGE_TOKENS, preprocess, for_generation)


def test_right_padded_training_batch(jsonl):
    dataset, skipped = build(jsonl)
    items = [dataset[i] for i in range(3)]
    batch = Collator(PAD)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["ids"] == ["two", "none", "one"] and not skipped
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for row, (item, length) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :length], item["input_ids"])
        assert torch.equal(batch["labels"][row, :length], item["labels"])
        assert (batch["input_ids"][row, length:] == PAD).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
    assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()


def test_images_concatenate_in_slot_order(jsonl):
    dataset, _ = build(jsonl)
    assert dataset[1]["images"].shape == (0, 3, 0, 0)
    batch = Collator(PAD)([dataset[i] for i in (2, 1, 0)])
    assert batch["images"].shape == (3, 3, 2, 2)
    # Image slots read row by row: item "one" (30), then "two" (10, 20).
    assert batch["images"][:, 0, 0, 0].tolist() == [30, 10, 20]
    assert (batch["input_ids"] == IMAGE_SLOT).sum(dim=1).tolist() == [IMAGE_TOKENS, 0, 2 * IMAGE_TOKENS]
    assert Collator(PAD)([dataset[1]])["images"] is None


def test_left_padded_generation_batch_keeps_references(jsonl):
    tokenizer = byte_tokenizer()
    dataset, _ = build(jsonl, for_generation=True)
    items = [dataset[i] for i in range(3)]
    batch = Collator(PAD, padding_side="left")(items)
    assert "labels" not in batch
    assert batch["references"] == ["The left one is darker.", "Hello.", "Red."]
    width = batch["input_ids"].shape[1]
    for row, item in enumerate(items):
        length = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, width - length :], item["input_ids"])
        assert batch["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        assert tokenizer.decode(item["input_ids"][-11:]) == "<|im_start|>assistant\n"


def test_too_long_sample_is_an_error_naming_the_record(jsonl):
    dataset, _ = build(jsonl)
    longest = len(dataset[0]["input_ids"])
    with pytest.raises(BadRecord) as caught:
        build(jsonl, max_length=longest - 1)
    assert (caught.value.line, caught.value.record_id) == (1, "two")
    assert caught.value.problem == f"{longest} tokens, longer than data.max_length={longest - 1}"


def test_too_long_sample_is_skipped_not_truncated(jsonl):
    dataset, _ = build(jsonl)
    longest = len(dataset[0]["input_ids"])
    dataset, skipped = build(jsonl, max_length=longest - 1, on_bad_record="skip")
    assert skipped == {"too long": 1}
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["none", "one"]
    assert all(len(dataset[i]["input_ids"]) <= longest - 1 for i in range(len(dataset)))


def test_eval_samples_caps_the_eval_file(jsonl):
    cfg = DataConfig(train="unused.jsonl", eval=str(jsonl), eval_samples=2)
    dataset, _ = build_dataset(str(jsonl), byte_tokenizer(), cfg, IMAGE_TOKENS, preprocess)
    assert len(dataset) == 2


def test_negative_pad_id_is_refused():
    with pytest.raises(ValueError, match="modality slots"):
        Collator(IMAGE_SLOT)


def test_images_without_an_image_encoder_are_refused(jsonl):
    cfg = DataConfig(train=str(jsonl))
    with pytest.raises(InputError, match=r"data.train: record 'two' \(line 1\) has images but the model has no image"):
        build_dataset(jsonl, byte_tokenizer(), cfg, 0, None)


def test_lengths_are_read_from_the_table_once(jsonl):
    # The trainer indexes `lengths` once per record; re-reading the column each time was quadratic.
    dataset, _ = build(jsonl)
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    first = dataset.lengths
    dataset.table = None  # a second read of the table would fail
    assert dataset.lengths == first
