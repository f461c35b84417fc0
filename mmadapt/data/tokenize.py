"""Token ids and labels of a conversation rendered by the tokenizer's chat template.

With SmolLM2's ChatML template, one image and ``image_tokens=3``::

    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n  -1 -1 -1  \\nDescribe.<|im_end|>\\n
    <|im_start|>assistant\\n  A red circle.<|im_end|>\\n
    labels: -100 everywhere except "A red circle.<|im_end|>\\n"

Each message's text is the difference between the renders of consecutive
conversation prefixes, and texts are tokenized one by one, so every token belongs
to exactly one message and labels are exact. Placeholders are not in the
vocabulary: text is split at ``<image>``/``<speech>`` and each becomes slots whose
id is the negative modality id (text ids are >= 0, so the model recovers
``modality_ids = (-input_ids).clamp(min=0)``). The ids equal those of tokenizing the
whole render with the placeholders as special tokens, then expanding them, as
long as message boundaries fall on pre-tokenizer boundaries (true for ChatML,
where every turn starts with a special token).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from transformers import PreTrainedTokenizerBase

from mmadapt.errors import InputError
from mmadapt.modality import IMAGE, SPEECH

IGNORE_INDEX = -100
IMAGE_SLOT, SPEECH_SLOT = -IMAGE, -SPEECH
_PLACEHOLDER = re.compile(r"(<image>|<speech>)")
# Stands in for an assistant message's content to find where the template puts it.
_CONTENT_MARK = "\x00mmadapt-content\x00"


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    image_tokens: int,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
) -> dict[str, list[int]]:
    """Token ids and labels of a conversation.

    Labels are the token ids on assistant messages (content and the end-of-turn
    text the template closes them with, so the model learns to stop) and
    ``IGNORE_INDEX`` on role headers, system/user text and modality slots.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: ``[{"role", "content"}]``, contents may hold placeholders.
        image_tokens: slots per ``<image>`` (the vision encoder's token count; 0 for
            a model without one, which then refuses ``<image>``).
        system_prompt: prepended as a system message when the conversation has none.
        add_generation_prompt: end with the template's assistant header.

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, equally long.

    Raises:
        InputError: the chat template does not render conversations prefix by prefix,
            or an ``<image>`` comes with ``image_tokens=0``.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, labelled in _spans(tokenizer, _with_system_prompt(messages, system_prompt), add_generation_prompt):
        ids = _encode_text(tokenizer, text, image_tokens)
        input_ids += ids
        labels += [token if labelled and token >= 0 else IGNORE_INDEX for token in ids]
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    image_tokens: int,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of a prompt for generation: ``messages`` then the assistant header.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: the conversation so far, without the answer to generate.
        image_tokens: slots per ``<image>``.
        system_prompt: prepended as a system message when the conversation has none.

    Returns:
        The input ids, modality slots included.
    """
    encoded = encode_conversation(tokenizer, messages, image_tokens, system_prompt, add_generation_prompt=True)
    return encoded["input_ids"]


def _with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> Iterator[tuple[str, bool]]:
    """The rendered conversation as consecutive ``(text, labelled)`` pieces."""
    renders = [""] + [_render(tokenizer, messages[:k]) for k in range(1, len(messages) + 1)]
    for k, message in enumerate(messages):
        segment = _after(renders[k], renders[k + 1])
        if message["role"] != "assistant":
            yield segment, False
            continue
        marked = _render(tokenizer, [*messages[:k], {"role": "assistant", "content": _CONTENT_MARK}])
        header = _after(renders[k], marked).partition(_CONTENT_MARK)[0]
        if not segment.startswith(header):
            raise InputError(f"the chat template renders assistant message {k} without its header {header!r}")
        yield header, False
        yield segment[len(header) :], True
    if add_generation_prompt:
        yield _after(renders[-1], _render(tokenizer, messages, add_generation_prompt=True)), False


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _after(prefix: str, text: str) -> str:
    """What ``text`` adds after ``prefix``; the template must render prefixes as prefixes."""
    if not text.startswith(prefix):
        raise InputError(
            "the tokenizer's chat template renders the start of a conversation differently once more "
            "messages follow, so message boundaries (and labels) cannot be found; use a template that "
            f"renders message by message. Render of the shorter conversation: {prefix!r}"
        )
    return text[len(prefix) :]


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str, image_tokens: int) -> list[int]:
    ids: list[int] = []
    for piece in _PLACEHOLDER.split(text):
        if piece == "<image>":
            if image_tokens < 1:
                raise InputError("an <image> placeholder needs a model with an image encoder (image_tokens is 0)")
            ids += [IMAGE_SLOT] * image_tokens
        elif piece == "<speech>":
            # One slot: a speech item's length is known only after its encoder runs.
            ids.append(SPEECH_SLOT)
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def encode_distillation(
    tokenizer: PreTrainedTokenizerBase,
    transcript: str,
    response: str,
    speech_prompt: str,
    system_prompt: str | None = None,
) -> dict[str, list[int] | int]:
    """Student and teacher sequences of a BLSP-KD record, aligned token for token.

    The user turn is ``speech_prompt`` with ``{transcript}`` replaced by one speech slot
    (student) or by the transcript's own tokens (teacher); the assistant turn is the
    teacher's continuation ``response``, labelled in both. The transcript is tokenized
    on its own, so the teacher's sequence is the student's with the slot replaced by
    ``speech_length`` tokens; CIF cut to that many tokens makes the two the same length.

    Returns:
        ``input_ids``/``labels`` (student), ``teacher_input_ids``/``teacher_labels`` and
        ``speech_length`` (the transcript's token count).
    """
    before, _, after = speech_prompt.partition("{transcript}")
    joiner = " " if before.endswith(" ") else ""  # the space belongs to the transcript's first token
    user = before.removesuffix(joiner) + "<speech>" + after
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    student = encode_conversation(tokenizer, messages, image_tokens=0, system_prompt=system_prompt)
    transcript_ids = tokenizer(joiner + transcript, add_special_tokens=False)["input_ids"]
    slot = student["input_ids"].index(SPEECH_SLOT)
    ids, labels = student["input_ids"], student["labels"]
    return {
        **student,
        "teacher_input_ids": ids[:slot] + transcript_ids + ids[slot + 1 :],
        "teacher_labels": labels[:slot] + [IGNORE_INDEX] * len(transcript_ids) + labels[slot + 1 :],
        "speech_length": len(transcript_ids),
    }


def distillation_prompt(
    tokenizer: PreTrainedTokenizerBase, transcript: str, speech_prompt: str, system_prompt: str | None = None
) -> list[int]:
    """The teacher's prompt ids, through the assistant header, exactly as
    :func:`encode_distillation` builds them (for generating the ``response``)."""
    # Any non-empty response: labels start where the assistant's content starts.
    encoded = encode_distillation(tokenizer, transcript, "-", speech_prompt, system_prompt)
    first_label = next(i for i, label in enumerate(encoded["teacher_labels"]) if label != IGNORE_INDEX)
    return encoded["teacher_input_ids"][:first_label]
