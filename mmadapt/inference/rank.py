"""Candidate images for an article and the rankers that score them against a caption.

A ranker scores a batch of images for one caption, higher is better::

    ranker = LikelihoodRanker(model)                  # any trained mmadapt checkpoint
    ranker = ClipRanker("ViT-B-32", "clip.safetensors")  # open_clip, local weights only
    scores = ranker.scores("A red circle.", [image, ...], batch_size=8)

:class:`LikelihoodRanker` asks the model itself: the score of an image is
``sum log p(caption tokens | image prompt)`` under the chat template, i.e. how likely
the model is to answer the caption prompt ("Describe the picture.") about that image
with the caption, some tokens weighted down (see the class).
Every candidate shares the same token ids (only the image differs), so a batch needs no
padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from mmadapt.data.collate import Collator
from mmadapt.data.tokenize import IGNORE_INDEX, encode_conversation
from mmadapt.errors import InputError
from mmadapt.evaluate import model_inputs
from mmadapt.losses import predicting_positions
from mmadapt.model import MultimodalLM

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_PROMPT = "Describe the picture."
CLOSING_WEIGHT = 0.1  # see LikelihoodRanker
UNEXPLAINED_BELOW = 1e-3  # see LikelihoodRanker


@dataclass(frozen=True)
class Candidate:
    """One image of the candidate folder, decoded once and kept in memory: ``name`` is its file name."""

    path: Path
    image: Image.Image

    @property
    def name(self) -> str:
        return self.path.name


def read_image(path: Path, what: str = "image") -> Image.Image:
    """Decode an image file to RGB.

    Raises:
        InputError: ``path`` is missing or not a readable image.
    """
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{what} {path}: not a readable image ({error})") from None


def load_candidates(folder: str | Path) -> list[Candidate]:
    """Every image file (by suffix, hidden files skipped) of ``folder``, sorted by name.

    Raises:
        InputError: the folder is missing, holds no image file, or one of them is unreadable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"candidate image folder {folder}: no such folder")
    paths = sorted(
        path for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )
    if not paths:
        raise InputError(f"candidate image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Candidate(path, read_image(path, "candidate image")) for path in paths]


class Ranker(Protocol):
    """Scores images for a caption; higher means a better illustration."""

    def scores(
        self, caption: str, images: Sequence[Image.Image], batch_size: int = 8,
        on_scored: Callable[[int], None] | None = None,
    ) -> list[float]:
        """One score per image, ``batch_size`` images per forward pass; ``on_scored(n)`` after each
        batch of ``n``. A score may depend on the other images of the call, never on how they are
        batched."""
        ...

    def describe(self) -> dict:
        """What ranks, for the decision record."""
        ...


class LikelihoodRanker:
    """The model's own log-likelihood of the caption as its answer about each image.

    The answer's tokens in the *scored span* count fully. The span is the caption's words up
    to the first token that no candidate explains (its probability below ``unexplained_below``
    for every image); it is the same for every image of the call. Three kinds of token count
    less, by ``closing_weight`` for each kind they are: the tokens that close the answer, the
    words past the span, and the words no candidate explains (all of them past the span). So
    the closing tokens of a caption cut short count ``closing_weight**2``, as do the
    unexplained words, and the other words past the span outweigh both by the factor by which
    the words of an uncut caption outweigh its closing tokens.

    Why the closing tokens (the full stop and the end of turn) count less: they assert that
    the picture shows nothing else. At full weight they cost a trained model up to ~13 nats
    on a picture with more in it, so "A yellow circle." went to a picture of a yellow square
    when every yellow circle shared its picture with other shapes. At weight 0 the extra
    content is free and ties among the pictures that do show the caption fall to cluttered
    ones; a small weight ranks by content first and prefers the tidier picture among equals.

    Why the span ends at an unexplained token: there the caption leaves what the model
    learned to say about pictures ("A yellow circle *with* a square inside it.": " with" is
    below 1e-6 on every candidate), and everything after it is predicted from a text the model
    never saw. Those predictions still differ between images, by up to ~10 nats, and that
    noise outweighed "circle": the caption went to a yellow square. Only the tokens before
    the span's end are trusted in full. The words past it still count a little, for a caption
    that leaves the descriptions before it names anything ("A person visiting the green
    square."): there the words past the span are all the evidence there is.

    Why an unexplained word counts less again: every picture finds it unlikely, and by how
    much is noise. In "A small green square, a special place, ..." " small" and " special"
    cost 10-20 nats on every candidate; counted like the other words past the span, the 2.5
    nats by which a picture without a green square found them less unlikely outweighed the
    1.8 nats by which the other words, " green" among them, preferred a picture with one.

    Args:
        model: a trained model with an image encoder (eval mode).
        system_prompt: the run's ``data.system_prompt``, as in training.
        prompt: the user text after the image, as in the training data.
        name: what error messages call the model, e.g. its run folder.
        closing_weight: the discount, in [0, 1], for each kind of discounted token.
        unexplained_below: the probability in [0, 1) under which a word no image reaches is
            unexplained (the first one ends the scored span); 0: no word is.

    Raises:
        InputError: the model has no image encoder, or a weight or probability out of range.
    """

    def __init__(
        self, model: MultimodalLM, system_prompt: str | None = None, prompt: str = CAPTION_PROMPT,
        name: str = "the model", closing_weight: float = CLOSING_WEIGHT, unexplained_below: float = UNEXPLAINED_BELOW,
    ) -> None:
        if "image" not in model.encoders:
            raise InputError(f"{name} has no image encoder, so it cannot rank images; use an open_clip ranker (--clip)")
        if not 0 <= closing_weight <= 1:
            raise InputError(f"closing_weight must be in [0, 1], got {closing_weight}")
        if not 0 <= unexplained_below < 1:
            raise InputError(f"unexplained_below must be in [0, 1), got {unexplained_below}")
        self.model = model
        self.system_prompt = system_prompt
        self.prompt = prompt
        self.closing_weight = closing_weight
        self.unexplained_below = unexplained_below

    def describe(self) -> dict:
        return {
            "type": "likelihood", "prompt": self.prompt, "closing_weight": self.closing_weight,
            "unexplained_below": self.unexplained_below,
        }

    @torch.no_grad()
    def scores(
        self, caption: str, images: Sequence[Image.Image], batch_size: int = 8,
        on_scored: Callable[[int], None] | None = None,
    ) -> list[float]:
        tokenizer = self.model.tokenizer
        messages = [
            {"role": "user", "content": f"<image>\n{self.prompt}"},
            {"role": "assistant", "content": caption},
        ]
        encoded = encode_conversation(tokenizer, messages, self.model.encoders["image"].num_tokens, self.system_prompt)
        log_probs = torch.cat(_in_batches(images, batch_size, on_scored, lambda chunk: self._log_probs(encoded, chunk)))
        answer = [token for token in encoded["labels"] if token != IGNORE_INDEX]
        words = _common_prefix(answer, tokenizer(description_start(caption), add_special_tokens=False)["input_ids"])
        unexplained = unexplained_words(log_probs, words, self.unexplained_below)
        span = scored_span(log_probs, words, self.unexplained_below)
        weights = torch.ones(log_probs.shape[1], device=log_probs.device)
        weights[span:] *= self.closing_weight  # words past an unexplained one, and the closing tokens
        if span < words:
            weights[words:] *= self.closing_weight  # closing tokens past an unexplained word: both
        weights[:words][unexplained] *= self.closing_weight  # unexplained words, past the span: both
        return (log_probs @ weights).tolist()

    def _log_probs(self, encoded: dict, images: Sequence[Image.Image]) -> torch.Tensor:
        """``log p`` of each answer token given each image: ``[B, N]``."""
        encoder = self.model.encoders["image"]
        items = [
            {
                "id": str(i),
                "input_ids": torch.tensor(encoded["input_ids"]),
                "labels": torch.tensor(encoded["labels"]),
                "images": encoder.preprocess(image)[None],  # (1, 3, S, S)
            }
            for i, image in enumerate(images)
        ]
        batch = Collator(self.model.tokenizer.pad_token_id)(items)  # equal lengths: no padding
        device = next(self.model.parameters()).device
        inputs = {key: value.to(device) for key, value in model_inputs(batch).items()}
        return answer_log_probs(self.model(**inputs).logits, inputs["labels"])


def scored_span(log_probs: torch.Tensor, words: int, unexplained_below: float) -> int:
    """How many leading answer tokens :class:`LikelihoodRanker` counts fully: the first ``words``,
    cut at the first token whose ``log p`` is below ``log(unexplained_below)`` in every row.

    Args:
        log_probs: ``[images, tokens]`` log-probabilities of the answer's tokens.
        words: how many of those tokens are the caption's words.
        unexplained_below: a probability; 0 never cuts.
    """
    unexplained = unexplained_words(log_probs, words, unexplained_below).nonzero()
    return int(unexplained[0]) if len(unexplained) else words


def unexplained_words(log_probs: torch.Tensor, words: int, unexplained_below: float) -> torch.Tensor:
    """Which of the first ``words`` answer tokens no image explains: ``[tokens]`` booleans, true
    where ``log p`` is below ``log(unexplained_below)`` in every row (0: none)."""
    if unexplained_below == 0:
        return torch.zeros(words, dtype=torch.bool, device=log_probs.device)
    return log_probs[:, :words].max(dim=0).values < math.log(unexplained_below)


def _in_batches(
    images: Sequence[Image.Image], batch_size: int, on_scored: Callable[[int], None] | None, score: Callable
) -> list:
    """``score(chunk)`` for each run of ``batch_size`` images, in order; ``on_scored(len(chunk))`` after each."""
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        results.append(score(chunk))
        if on_scored is not None:
            on_scored(len(chunk))
    return results


def description_start(caption: str) -> str:
    """The caption's words: without the punctuation that closes it."""
    return caption.rstrip(" .!?") or caption


def _common_prefix(tokens: Sequence[int], prefix: Sequence[int]) -> int:
    """How many leading tokens agree (a merge across the words' end stops it early)."""
    return next((k for k, (a, b) in enumerate(zip(tokens, prefix)) if a != b), min(len(tokens), len(prefix)))


def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(label)`` at each labelled position: ``[B, T, V], [B, T] -> [B, N]``.

    Every row must label the same number of tokens (one answer scored against many images).
    """
    keep = predicting_positions(labels)  # (B, T): position t predicts labelled token t+1
    log_probs = F.log_softmax(logits[keep].float(), dim=-1)  # (B·N, V)
    targets = labels[:, 1:][keep[:, :-1]]  # (B·N,)
    return log_probs.gather(1, targets[:, None]).view(len(labels), -1)


class ClipRanker:
    """Cosine similarity of open_clip image and caption embeddings.

    Args:
        model_name: an open_clip architecture name (``open_clip.list_models()``).
        weights: a local checkpoint file of that architecture; nothing is downloaded.
        device: where the CLIP model runs.

    Raises:
        InputError: an unknown name, a missing weights file, or weights that do not fit.
    """

    def __init__(self, model_name: str, weights: str | Path, device: str | torch.device = "cpu") -> None:
        import open_clip

        if model_name not in open_clip.list_models():
            raise InputError(f"--clip {model_name!r} is not an open_clip model name (see open_clip.list_models())")
        if not Path(weights).is_file():
            raise InputError(f"--clip-weights {weights}: no such file (only local weights are used)")
        try:
            # An absolute path is never taken for one of open_clip's download tags.
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(Path(weights).resolve()), device=device
            )
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            raise InputError(f"--clip-weights {weights} do not load into open_clip {model_name}: {error}") from None
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name, self.weights, self.device = model_name, str(weights), device

    def describe(self) -> dict:
        return {"type": "open_clip", "model": self.model_name, "weights": self.weights}

    @torch.no_grad()
    def scores(
        self, caption: str, images: Sequence[Image.Image], batch_size: int = 8,
        on_scored: Callable[[int], None] | None = None,
    ) -> list[float]:
        text_embeds = F.normalize(self.model.encode_text(self.tokenizer([caption]).to(self.device)), dim=-1)  # (1, E)
        image_embeds = torch.cat(_in_batches(images, batch_size, on_scored, self._image_embeds))  # (B, E)
        return (image_embeds @ text_embeds.T)[:, 0].tolist()

    def _image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)  # (B, 3, S, S)
        return F.normalize(self.model.encode_image(pixels), dim=-1)  # (B, E)
