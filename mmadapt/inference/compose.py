"""Interleaved text-image composition: the model writes an article and illustrates it
with images chosen from a local folder.

::

    model = mmadapt.load_trained("OUT")
    compose(model, "Write a short article about shapes.", "pictures/", "article/", num_images=2)
    # article/article.md (+ article/images/), article/article.html, article/decisions.json

The steps, each recorded in ``decisions.json``:

1. **Text.** Without an outline the model answers the instruction once and each line
   of its answer is a paragraph. With an outline it writes one paragraph per outline
   line, turn by turn in one conversation. Reference images join the first turn.
2. **Slots** (an image goes after a paragraph). Outline lines ending in ``[image]``
   ask for one. Otherwise the model sees the numbered paragraphs and is asked which
   ones need a picture (exactly N for ``num_images=N``); when its answer does not
   give that many usable paragraph numbers (``auto``: at least one), the images are
   spread evenly instead (:func:`even_positions`). Without an outline, an answer with fewer
   paragraphs than images wanted is first cut at sentence ends (:func:`split_paragraphs`), so
   two images follow one paragraph only when no paragraph has two sentences left to cut.
3. **Captions**: one per slot, the model's short caption for that paragraph, cut after its
   first sentence. With an outline the request also names the paragraph's outline topic, the
   user's own words for what the slot is about. Two worked examples come first as earlier
   chat turns; all slots are decoded in one batch.
4. **Images**: slot by slot, the ranker scores every candidate not used yet and the
   best one is taken (ties: the first by file name); no image is used twice.
5. **Output**, written by :mod:`mmadapt.inference.article`.

Every generation runs under ``seed`` (the caller's RNG state is restored after), so the
same inputs give the same article.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mmadapt.data.tokenize import encode_prompt
from mmadapt.errors import InputError
from mmadapt.inference.article import write_article
from mmadapt.inference.chat import PLACEHOLDERS, ChatSession
from mmadapt.inference.prompts import answer_tokens, decode, prompt_item
from mmadapt.inference.rank import CAPTION_PROMPT, Candidate, LikelihoodRanker, Ranker, load_candidates, read_image
from mmadapt.model import MultimodalLM

IMAGE_MARK = "[image]"
SHORT_ANSWER_TOKENS = 32  # a caption, or a list of paragraph numbers
CAPTION_ASK = "Write a short caption, a few words, for a picture that illustrates this paragraph."
CAPTION_EXAMPLES = (  # (topic, paragraph, caption) turns shown before each caption request
    (
        "The fisherman's catch",
        "The old fisherman pulled his net from the water at dawn, and it was full of silver fish that "
        "glittered in the sun.",
        "A fisherman pulling a net of fish.",
    ),
    (
        "Our kitten",
        "Our kitten spent the whole afternoon chasing a ball of yarn across the living room floor.",
        "A kitten playing with yarn.",
    ),
)
_PLACEHOLDER = re.compile("|".join(map(re.escape, PLACEHOLDERS)))
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=\S)")  # between two sentences


@dataclass(frozen=True)
class OutlineLine:
    """One outlined paragraph: what it is about, and whether an image follows it."""

    topic: str
    wants_image: bool


@dataclass(frozen=True)
class Slot:
    """An image placed after paragraph ``after`` (0-based), with its caption and every score."""

    after: int
    caption: str
    image: Candidate
    scores: dict[str, float]  # candidate file name -> score, best first; used images absent


def compose(
    model: MultimodalLM,
    instruction: str,
    candidates_dir: str | Path,
    out_dir: str | Path,
    num_images: int | str = "auto",
    outline: str | Sequence[str] | None = None,
    references: Sequence[str | Path] = (),
    seed: int = 0,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    ranker: Ranker | None = None,
    on_text: Callable[[str], None] | None = None,
    *,
    system_prompt: str | None = None,
    caption_prompt: str = CAPTION_PROMPT,
    batch_size: int = 8,
    progress: bool = False,
) -> Path:
    """Write an illustrated article to ``out_dir``: ``article.md``, ``article.html``, ``decisions.json``.

    Args:
        model: a loaded model (eval mode); it writes the text, and ranks images unless ``ranker`` is given.
        instruction: what to write.
        candidates_dir: folder of candidate images (``.png``, ``.jpg``, ...).
        out_dir: output folder, created if missing; files of an earlier run are replaced.
        num_images: how many images, or ``"auto"`` (the outline's marks, else the model decides).
        outline: one paragraph topic per line (a string or a list of lines); a line ending in
            ``[image]`` asks for an image after its paragraph.
        references: images the model sees with the instruction.
        seed: seeds every sampled token.
        temperature: 0 decodes greedily; above 0 samples text and captions at this temperature.
        max_new_tokens: longest article (without an outline) or paragraph (with one), in tokens;
            captions and the answer about slots are at most ``min(32, max_new_tokens)``.
        ranker: scores candidates for a caption; None: the model's caption likelihood.
        on_text: called with each piece of article text as it is written.
        system_prompt: the run's ``data.system_prompt``.
        caption_prompt: the user text the likelihood ranker puts after the image.
        batch_size: candidates scored per forward pass.
        progress: show a tqdm bar (stderr) while ranking.

    Returns:
        ``out_dir``.

    Raises:
        InputError: a missing or unreadable image, an empty candidate folder, more images asked
            for than candidates, a bad ``num_images`` or outline, or a model that cannot rank images.
    """
    if not instruction.strip():
        raise InputError("compose: the instruction is empty")
    if temperature < 0 or max_new_tokens < 1:
        raise InputError("compose: the temperature must be at least 0 and max_new_tokens at least 1")
    wanted = _images_wanted(num_images)
    lines = parse_outline(outline) if outline is not None else []
    for reference in references:
        read_image(Path(reference), "reference image")
    candidates = load_candidates(candidates_dir)
    _check_counts(wanted, lines, len(candidates), Path(candidates_dir))
    ranker = ranker or LikelihoodRanker(model, system_prompt, caption_prompt)
    writer = _Writer(model, system_prompt, temperature, max_new_tokens)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        paragraphs = writer.article(instruction, lines, references, on_text)
        if not lines and wanted:
            paragraphs = split_paragraphs(paragraphs, wanted)
        positions, placement = choose_positions(paragraphs, lines, wanted, len(candidates), writer.placement)
        captions = writer.captions([paragraphs[p] for p in positions], [lines[p].topic for p in positions if lines])
    slots = pick_images(ranker, positions, captions, candidates, batch_size, progress)
    record = {
        "instruction": instruction,
        "outline": [{"topic": line.topic, "image": line.wants_image} for line in lines],
        "references": [str(path) for path in references],
        "candidates_dir": str(candidates_dir),
        "num_images": "auto" if wanted is None else wanted,
        "seed": seed,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "ranker": ranker.describe(),
        "paragraphs": paragraphs,
        "placement": placement,
    }
    write_article(Path(out_dir), paragraphs, slots, record)
    return Path(out_dir)


def parse_outline(outline: str | Sequence[str]) -> list[OutlineLine]:
    """Outline lines (blank ones skipped, list bullets and numbers dropped) with their image marks.

    Raises:
        InputError: the outline has no line with a topic.
    """
    texts = outline.splitlines() if isinstance(outline, str) else list(outline)
    lines = []
    for text in texts:
        topic = _BULLET.sub("", text).strip()
        wants_image = topic.lower().endswith(IMAGE_MARK)
        topic = topic[: -len(IMAGE_MARK)].strip() if wants_image else topic
        if topic:
            lines.append(OutlineLine(topic, wants_image))
        elif wants_image:
            raise InputError(f"outline line {text!r}: an {IMAGE_MARK} mark needs a topic before it")
    if not lines:
        raise InputError("the outline has no topics: give one paragraph topic per line")
    return lines


def _images_wanted(num_images: int | str) -> int | None:
    """The image count asked for; None for ``auto``."""
    if num_images == "auto":
        return None
    text = str(num_images).strip()
    if not text.isdecimal():
        raise InputError(f"the number of images must be a whole number or 'auto', not {num_images!r}")
    return int(text)


def _check_counts(wanted: int | None, lines: list[OutlineLine], candidates: int, folder: Path) -> None:
    marked = sum(line.wants_image for line in lines)
    if marked and wanted is not None and wanted != marked:
        raise InputError(f"the outline marks {marked} paragraphs with {IMAGE_MARK} but {wanted} images are asked for")
    needed = marked or wanted or 0
    if needed > candidates:
        raise InputError(
            f"{needed} images asked for but {folder} holds only {candidates} candidate images "
            "(an image is never used twice)"
        )


class _Writer:
    """Every text the model writes for an article, with one set of sampling settings."""

    def __init__(self, model: MultimodalLM, system_prompt: str | None, temperature: float, max_new_tokens: int):
        self.model, self.system_prompt, self.max_new_tokens = model, system_prompt, max_new_tokens
        self.short_answer = min(SHORT_ANSWER_TOKENS, max_new_tokens)
        self.sampling = {"do_sample": temperature > 0, "temperature": temperature or 1.0}

    def article(self, instruction: str, lines: list[OutlineLine], references, on_text) -> list[str]:
        """The paragraphs: one answer split at line breaks, or one answer per outline line."""
        session = ChatSession(self.model, self.system_prompt)
        settings = {"max_new_tokens": self.max_new_tokens, **self.sampling, "on_text": on_text}
        if not lines:
            answer, _ = session.ask(instruction, images=references, **settings)
            paragraphs = [_model_text(text) for text in answer.splitlines()]
            paragraphs = [text for text in paragraphs if text]
            if not paragraphs:
                raise InputError(f"the model wrote no text for {instruction!r}; try a higher temperature")
            return paragraphs
        paragraphs = []
        for k, line in enumerate(lines):
            if k and on_text is not None:
                on_text("\n\n")
            ask = f"{instruction}\n\nWrite the first of {len(lines)} paragraphs, about: {line.topic}"
            answer, _ = session.ask(
                ask if k == 0 else f"Write the next paragraph, about: {line.topic}",
                images=references if k == 0 else (), **settings,
            )
            # A paragraph the model leaves empty falls back to its outline line.
            paragraphs.append(_model_text(answer) or line.topic)
        return paragraphs

    def captions(self, paragraphs: list[str], topics: list[str]) -> list[str]:
        """A few words per paragraph for the picture after it, all decoded in one batch: the
        first sentence of the model's answer (the paragraph itself where it writes none).

        Args:
            paragraphs: the paragraphs an image follows.
            topics: their outline topics, shown with each paragraph; empty without an outline.
                The model's paragraph may stray from what the user asked the slot to be
                about, and its caption then describes the stray.

        Two worked examples come first as earlier turns: without them small models tend to
        repeat the paragraph instead of captioning it. A caption names one picture, so a
        second sentence (small models go on listing) is dropped.
        """
        examples = [
            turn
            for topic, example, caption in CAPTION_EXAMPLES
            for turn in (_caption_ask(example, topic if topics else None), {"role": "assistant", "content": caption})
        ]
        asks = [
            [*examples, _caption_ask(paragraph, topic)]
            for paragraph, topic in zip(paragraphs, topics or [None] * len(paragraphs))
        ]
        answers = self._answers(asks, self.short_answer, **self.sampling)
        captions = [_SENTENCE_END.split(_model_text(answer), maxsplit=1)[0].strip("\"'") for answer in answers]
        return [caption or paragraph for caption, paragraph in zip(captions, paragraphs)]

    def placement(self, paragraphs: list[str], wanted: int | None) -> str:
        """The model's (greedy) answer to which paragraphs need a picture."""
        numbered = "\n".join(f"{k}. {text}" for k, text in enumerate(paragraphs, start=1))
        which = f"Choose the {wanted} paragraphs" if wanted else "Choose the paragraphs"
        ask = (
            f"Here is an article, one numbered paragraph per line:\n{numbered}\n\n{which} that should be "
            "followed by a picture. Answer with the paragraph numbers only, separated by commas."
        )
        [answer] = self._answers([[_user(ask)]], self.short_answer)
        return answer

    def _answers(self, conversations: list[list[dict[str, str]]], max_new_tokens: int, **sampling) -> list[str]:
        """The next text-only answer of each conversation, decoded together."""
        if not conversations:
            return []
        tokenizer = self.model.tokenizer
        items = [
            prompt_item(str(k), encode_prompt(tokenizer, messages, 0, self.system_prompt), [], [])
            for k, messages in enumerate(conversations)
        ]
        return [decode(tokenizer, tokens) for tokens in answer_tokens(self.model, items, max_new_tokens, **sampling)]


def choose_positions(
    paragraphs: list[str],
    lines: list[OutlineLine],
    wanted: int | None,
    candidates: int,
    ask: Callable[[list[str], int | None], str],
) -> tuple[list[int], dict]:
    """Paragraph indices an image follows (sorted, repeats only when images outnumber paragraphs),
    and how they were chosen: ``{"method": "outline" | "model" | "even" | "none", "answer": ...}``.

    Args:
        paragraphs: the article.
        lines: its outline (empty without one).
        wanted: the number of images asked for; None for ``auto``.
        candidates: how many images there are (``auto`` never asks for more).
        ask: ``ask(paragraphs, wanted)`` is the model's answer to which paragraphs need a picture.
    """
    if any(line.wants_image for line in lines):
        return [k for k, line in enumerate(lines) if line.wants_image], {"method": "outline", "answer": None}
    if wanted == 0:
        return [], {"method": "none", "answer": None}
    answer = ask(paragraphs, wanted)
    chosen = parse_positions(answer, len(paragraphs))[: wanted or candidates]
    if chosen and (wanted is None or len(chosen) == wanted):
        return sorted(chosen), {"method": "model", "answer": answer}
    count = wanted if wanted is not None else min(candidates, math.ceil(len(paragraphs) / 2))
    return even_positions(len(paragraphs), count), {"method": "even", "answer": answer}


def parse_positions(answer: str, paragraphs: int) -> list[int]:
    """The distinct paragraph numbers (1-based, in range) of an answer, as 0-based indices in order."""
    found = []
    for number in re.findall(r"\d+", answer):
        index = int(number) - 1
        if 0 <= index < paragraphs and index not in found:
            found.append(index)
    return found


def split_paragraphs(paragraphs: list[str], count: int) -> list[str]:
    """The paragraphs, the longest cut in two at a sentence end, until there are ``count`` of
    them or none has two sentences left. Two images after one paragraph would be captioned
    from the same text, alike, and the second would illustrate nothing new."""
    paragraphs = list(paragraphs)
    while len(paragraphs) < count:
        splittable = [(len(text), k) for k, text in enumerate(paragraphs) if _SENTENCE_END.search(text)]
        if not splittable:
            break
        _, k = max(splittable)
        paragraphs[k : k + 1] = _halves(paragraphs[k])
    return paragraphs


def _halves(paragraph: str) -> list[str]:
    """The paragraph cut at the sentence end nearest its middle."""
    cut = min(_SENTENCE_END.finditer(paragraph), key=lambda end: abs(end.start() - len(paragraph) / 2))
    return [paragraph[: cut.start()], paragraph[cut.end() :]]


def even_positions(paragraphs: int, count: int) -> list[int]:
    """``count`` paragraph indices spread evenly: image k follows paragraph ``(k+1)·P // (count+1)``,
    which repeats a paragraph only when images outnumber paragraphs."""
    return [min(paragraphs - 1, (k + 1) * paragraphs // (count + 1)) for k in range(count)]


def pick_images(
    ranker: Ranker,
    positions: list[int],
    captions: list[str],
    candidates: list[Candidate],
    batch_size: int,
    progress: bool,
) -> list[Slot]:
    """Slot by slot, the best-scoring candidate not used by an earlier slot."""
    total = sum(len(candidates) - k for k in range(len(captions)))
    bar = tqdm(total=total, desc="ranking images", unit="image", disable=not progress)
    slots, used = [], set()
    for after, caption in zip(positions, captions):
        free = [candidate for candidate in candidates if candidate.name not in used]
        scores = ranker.scores(caption, [candidate.image for candidate in free], batch_size, bar.update)
        ranked = sorted(zip(free, scores), key=lambda pair: -pair[1])  # stable: ties stay in name order
        best = ranked[0][0]
        used.add(best.name)
        slots.append(Slot(after, caption, best, {candidate.name: score for candidate, score in ranked}))
    bar.close()
    return slots


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _caption_ask(paragraph: str, topic: str | None) -> dict[str, str]:
    about = f"Topic: {topic}\n" if topic is not None else ""
    return _user(f"{about}Paragraph: {paragraph}\n{CAPTION_ASK}")


def _model_text(text: str) -> str:
    """Model-written text on one line, without placeholders (it is shown to the model again)."""
    return " ".join(_PLACEHOLDER.sub(" ", text).split())
