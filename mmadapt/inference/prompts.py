"""What chat and batch inference share: a loaded run, prompts as model input, their answers.

::

    model, cfg = load_run("OUT")
    item = prompt_item("q1", prompt_ids, images=[load_image(model, "a.png")], audios=[])
    [tokens] = answer_tokens(model, [item], max_new_tokens=32)
    answer = decode(model.tokenizer, tokens)

Images and audio go through the encoders' own ``preprocess`` / ``features``, as in
training. A list of items is left-padded by :class:`~mmadapt.data.Collator`, so every
prompt ends at the last column and ``MultimodalLM.generate`` decodes them together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from mmadapt.build import load_trained
from mmadapt.config import Config, load_config
from mmadapt.data.audio import load_audio
from mmadapt.data.collate import Collator
from mmadapt.errors import InputError
from mmadapt.evaluate import generation_inputs
from mmadapt.model import MultimodalLM


def load_run(output_dir: str | Path, device: str | torch.device | None = None) -> tuple[MultimodalLM, Config]:
    """A finished run's model (``load_trained``, on ``device``) and its resolved config.

    Args:
        output_dir: the run's folder (OUT).
        device: where the model runs; None: CUDA when available, else the CPU.

    Raises:
        InputError: the folder is not a finished run, or its base weights changed.
    """
    model = load_trained(output_dir)
    cfg = load_config(Path(output_dir) / "config.yaml")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), cfg


def load_image(model: MultimodalLM, path: str | Path, name: str = "the model") -> torch.Tensor:
    """An image file preprocessed for the model's image encoder: ``[3, H, W]``.

    Raises:
        InputError: the file is missing or not an image, or the model (called ``name``
            in the message) has no image encoder.
    """
    path = Path(path)
    encoder = _encoder(model, "image", path, name)
    if not path.is_file():
        raise InputError(f"image {path}: no such file")
    try:
        with Image.open(path) as image:
            return encoder.preprocess(image)
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"image {path}: not a readable image ({error})") from None


def load_audio_features(model: MultimodalLM, path: str | Path, name: str = "the model") -> torch.Tensor:
    """An audio file as the speech encoder's log-mel features: ``[mels, frames]``.

    Raises:
        InputError: the file is missing or not decodable audio, or the model has no speech encoder.
    """
    path = Path(path)
    return _encoder(model, "speech", path, name).features(load_audio(path))


def _encoder(model: MultimodalLM, kind: str, path: Path, name: str) -> nn.Module:
    if kind not in model.encoders:
        raise InputError(f"{name} has no {kind} encoder, so it cannot take {path}")
    return model.encoders[kind]


def prompt_item(
    item_id: str, input_ids: Sequence[int], images: Sequence[torch.Tensor], audios: Sequence[torch.Tensor]
) -> dict:
    """One prompt as a :class:`~mmadapt.data.Collator` item.

    Args:
        item_id: carried into the batch's ``ids``.
        input_ids: prompt ids with modality slots (``encode_prompt``).
        images: preprocessed images ``[3, H, W]`` in placeholder order.
        audios: log-mel features ``[mels, frames]`` in placeholder order.
    """
    return {
        "id": item_id,
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "images": torch.stack(list(images)) if images else torch.zeros(0, 3, 0, 0),
        "audios": list(audios),
    }


def answer_tokens(
    model: MultimodalLM,
    items: list[dict],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Answer every prompt of ``items`` in one left-padded ``generate`` call.

    Args:
        model: the model, in eval mode.
        items: :func:`prompt_item` dicts; any mix of image, speech and text-only prompts.
        max_new_tokens: longest answer in tokens.
        do_sample: sample at ``temperature`` instead of greedy decoding.
        temperature: softmax temperature when sampling.
        on_token: called with each new token ``[B]`` (EOS on finished rows), for streaming.

    Returns:
        Each prompt's answer token ids, end-of-turn dropped.
    """
    batch = Collator(model.tokenizer.pad_token_id, padding_side="left")(items)
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in generation_inputs(batch).items()}
    settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature}
    new = model.generate(**inputs, **settings, on_token=on_token)  # (B, <= max_new_tokens)
    eos = model.tokenizer.eos_token_id
    return [[token for token in row if token != eos] for row in new.tolist()]


def decode(tokenizer, tokens: list[int]) -> str:
    """Answer text of token ids; clean-up off, so longer lists only append text (streaming)."""
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
