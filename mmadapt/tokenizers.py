"""A byte-level chat tokenizer built in code, for tiny random test models.

It needs no files: 256 byte tokens and no merges, so every string round-trips
exactly, plus SmolLM2's three special tokens at SmolLM2's ids and SmolLM2's
ChatML chat template. A tiny model trained with it therefore sees the same
conversation layout as the embedded SmolLM2.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# SmolLM2-135M-Instruct's template, verbatim (read from its GGUF tokenizer): a
# conversation that does not open with a system message gets SmolLM2's default one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Same ids as SmolLM2: 0 unknown/document end, 1 turn start (bos), 2 turn end (eos).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level ChatML tokenizer (vocabulary of 259 tokens).

    Ids 0-2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; ids 3-258 are
    the 256 bytes (GPT-2's byte-level symbols in code point order). As in SmolLM2,
    ``<|im_end|>`` is both eos and pad (it ends every turn, so generation stops
    there) and ``<|im_start|>`` is bos, never added automatically.

    Returns:
        A fast tokenizer whose ``decode(encode(text))`` is ``text`` for any string.
    """
    # alphabet() has no defined order; sorting keeps ids stable across versions.
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(byte_symbols))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer

