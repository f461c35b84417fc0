"""Image and speech chat with a trained run: one conversation, answered turn by turn.

::

    session = ChatSession.from_run("OUT")
    answer, n = session.ask(audios=["question.wav"])      # the spoken audio is the instruction
    answer, n = session.ask("Say it in one sentence.")    # a follow-up still sees that audio

A user turn is its placeholders (``<image>`` per image, then ``<speech>`` per audio)
followed by its text. Every turn re-encodes and re-runs the whole conversation,
earlier images and audio included: simple and exact, at the cost of recomputing the
earlier turns; within a turn decoding reuses ``MultimodalLM.generate``'s KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mmadapt.data.tokenize import encode_prompt
from mmadapt.errors import InputError
from mmadapt.inference.prompts import answer_tokens, decode, load_audio_features, load_image, load_run, prompt_item
from mmadapt.model import MultimodalLM

PLACEHOLDERS = ("<image>", "<speech>")


class ChatSession:
    """A loaded model, the conversation so far and its images and audio in placeholder order.

    Args:
        model: the model to chat with (eval mode).
        system_prompt: the run's ``data.system_prompt`` (None keeps the template's default).
        name: what error messages call the model, e.g. its run folder.
    """

    def __init__(self, model: MultimodalLM, system_prompt: str | None = None, name: str = "the model") -> None:
        self.model = model
        self.system_prompt = system_prompt
        self.name = name
        self.messages: list[dict[str, str]] = []
        self.images: list[torch.Tensor] = []  # each [3, H, W], preprocessed
        self.audios: list[torch.Tensor] = []  # each [mels, frames], log-mel features

    @classmethod
    def from_run(cls, output_dir: str | Path, device: str | torch.device | None = None) -> ChatSession:
        """Load a finished run (``load_trained``) with its system prompt.

        Args:
            output_dir: the run's folder (OUT).
            device: where the model runs; None: CUDA when available, else the CPU.

        Raises:
            InputError: the folder is not a finished run, or its base weights changed.
        """
        model, cfg = load_run(output_dir, device)
        return cls(model, cfg.data.system_prompt, name=str(output_dir))

    def ask(
        self,
        text: str | None = None,
        images: Sequence[str | Path] = (),
        audios: Sequence[str | Path] = (),
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[str, int]:
        """Add a user turn, answer it and add the answer to the conversation.

        Args:
            text: the instruction or question; None with audio: the speech is the instruction.
            images: image files of this turn.
            audios: audio files of this turn.
            max_new_tokens: longest answer in tokens.
            do_sample: sample at ``temperature`` instead of greedy decoding.
            temperature: softmax temperature when sampling.
            on_text: called with each new piece of the answer as it is decoded; the
                pieces concatenate to the answer.

        Returns:
            ``(answer, tokens)``: the answer text and how many tokens it has (end-of-turn excluded).

        Raises:
            InputError: no input, a placeholder typed in ``text``, a missing or unreadable
                file, or a file for a modality the model has no encoder for.
        """
        turn_images = [load_image(self.model, path, self.name) for path in images]
        turn_audios = [load_audio_features(self.model, path, self.name) for path in audios]
        user = {"role": "user", "content": _user_content(text, len(turn_images), len(turn_audios))}
        messages = [*self.messages, user]
        all_images, all_audios = self.images + turn_images, self.audios + turn_audios
        settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature}
        tokens = self._generate(messages, all_images, all_audios, on_text, settings)
        answer = decode(self.model.tokenizer, tokens)
        # Committed only now, so a turn that failed leaves the conversation as it was.
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.images, self.audios = all_images, all_audios
        return answer, len(tokens)

    def _generate(self, messages, images, audios, on_text, settings: dict) -> list[int]:
        """Answer token ids (end-of-turn dropped) for the conversation ``messages``."""
        tokenizer = self.model.tokenizer
        image_tokens = self.model.encoders["image"].num_tokens if "image" in self.model.encoders else 0
        prompt = encode_prompt(tokenizer, messages, image_tokens, self.system_prompt)
        eos = tokenizer.eos_token_id
        stream = TextStream(tokenizer, on_text) if on_text is not None else None

        def on_token(token: torch.Tensor) -> None:
            if int(token[0]) != eos:
                stream.push(int(token[0]))

        item = prompt_item("chat", prompt, images, audios)
        [tokens] = answer_tokens(self.model, [item], **settings, on_token=on_token if stream is not None else None)
        if stream is not None:
            stream.finish()
        return tokens


class TextStream:
    """Incremental detokenisation for streaming: each pushed token shows the new text.

    The whole token list is decoded each time and only the new suffix is passed on, so
    tokens that decode differently alone than in context come out right. A character
    whose bytes span several tokens decodes to U+FFFD until its last byte arrives, so
    text ending in U+FFFD is held back until more tokens (or :meth:`finish`) come.
    Decoding a longer list only appends text (byte-level BPE and SentencePiece
    tokenizers, clean-up off), so the pieces concatenate to the decoded answer.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> None:
        """Add one token id; pass on the text it completes, if any."""
        self.tokens.append(token)
        text = decode(self.tokenizer, self.tokens)
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self) -> None:
        """Pass on whatever is still held back."""
        self._show(decode(self.tokenizer, self.tokens))

    def _show(self, text: str) -> None:
        piece = text[len(self.shown) :]
        if piece:
            self.on_text(piece)
        self.shown = text


def _user_content(text: str | None, images: int, audios: int) -> str:
    if text and any(placeholder in text for placeholder in PLACEHOLDERS):
        raise InputError(f"the text {text!r} holds a placeholder; pass the files as images or audio instead")
    content = "<image>" * images + "<speech>" * audios
    if not content and not text:
        raise InputError("nothing to answer: give a text, an image or an audio file")
    return "\n".join(part for part in (content, text) if part)
