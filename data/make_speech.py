"""Generates the bundled "speech" data set: short English sentences spoken by espeak-ng.

    python data/make_speech.py                      # data/speech/, 2000 train + 100 test
    python data/make_speech.py --out /tmp/s --train 20 --test 5 --seed 1

Sentences of 3-6 words over a 48-word vocabulary (animals, colours, sizes, numbers,
a few verbs) follow four templates: "The red cat sees two dogs.", "A big bird can
fly.", "The horses are not brown.", "Cats and dogs can run." Each utterance gets a
random espeak-ng voice (accent + speaker variant) and speed. Test sentences never
occur in train. Audio is 16 kHz mono Ogg Opus, which soundfile reads. Records follow
the BLSP-KD schema without ``response`` (a later step asks the teacher LLM for it):
``{"id", "audios", "transcript", "voice", "speed"}``.

The same seed draws the same sentences, voices and speeds, so the JSONL files and the
decoded audio repeat exactly (with the same espeak-ng); the .opus bytes differ, as
libsndfile picks a random Ogg stream serial. A larger ``--train`` with the same
``--test`` and seed keeps the existing records and appends new ones.
"""

import argparse
import functools
import io
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import soundfile
import torch
import torchaudio.functional

ANIMALS = {  # singular -> plural
    "cat": "cats",
    "dog": "dogs",
    "bird": "birds",
    "fish": "fish",
    "horse": "horses",
    "cow": "cows",
    "duck": "ducks",
    "frog": "frogs",
}
# What each animal plausibly can do, so "can" sentences stay sensible.
ABILITIES = {
    "cat": ("run", "jump"),
    "dog": ("run", "jump", "swim"),
    "bird": ("fly", "sing"),
    "fish": ("swim",),
    "horse": ("run", "jump"),
    "cow": ("run", "walk"),
    "duck": ("fly", "swim", "walk"),
    "frog": ("jump", "swim"),
}
VERBS = {"sees": "see", "likes": "like", "finds": "find", "chases": "chase"}  # singular -> plural agreement
COLOURS = ("red", "blue", "green", "black", "white", "brown")
SIZES = ("big", "small")
NUMBERS = ("two", "three", "four", "five")
FUNCTION_WORDS = ("the", "a", "and", "can", "is", "are", "not")
VOCABULARY = frozenset(
    [*ANIMALS, *ANIMALS.values(), *VERBS, *VERBS.values(), *COLOURS, *SIZES, *NUMBERS, *FUNCTION_WORDS]
    + [ability for abilities in ABILITIES.values() for ability in abilities]
)
MIN_WORDS, MAX_WORDS = 3, 6

# Accents and speaker variants that ship with espeak-ng itself (no mbrola voices).
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5")
MIN_SPEED, MAX_SPEED = 130, 190  # words per minute
SAMPLE_RATE = 16_000
# Opus at this level is ~27 kbit/s, a sixth of 16-bit FLAC's size; the mean log-mel
# error against the uncompressed audio is ~1.7 dB (measured on 30 utterances).
OPUS_COMPRESSION = 0.92
WORKERS = 2


@dataclass(frozen=True)
class NounPhrase:
    """Words naming one or more animals, e.g. ``("two", "big", "dogs")``."""

    words: tuple[str, ...]
    animal: str
    plural: bool


@dataclass(frozen=True)
class Utterance:
    """One planned recording: what is said, by which voice, how fast."""

    record_id: str
    text: str
    voice: str
    speed: int


def noun_phrases(adjectives: tuple[str, ...] = COLOURS + SIZES) -> list[NounPhrase]:
    """Lists every noun phrase: "the cat", "a red dog", "birds", "the big cows", "three fish".

    Args:
        adjectives: Adjectives allowed before the noun (at most one is used).

    Returns:
        Singular phrases take "the"/"a"; plural ones take nothing, "the" or a number.
    """
    phrases = []
    for animal, adjective in product(ANIMALS, (None, *adjectives)):
        middle = (adjective,) if adjective else ()
        for determiner in ("the", "a"):
            phrases.append(NounPhrase((determiner, *middle, animal), animal, False))
        for quantifier in (None, "the", *NUMBERS):
            front = (quantifier,) if quantifier else ()
            phrases.append(NounPhrase((*front, *middle, ANIMALS[animal]), animal, True))
    return phrases


def _transitive() -> list[tuple[str, ...]]:
    phrases = noun_phrases()
    return [
        (*subject.words, verb if not subject.plural else plural_verb, *obj.words)
        for subject, (verb, plural_verb), obj in product(phrases, VERBS.items(), phrases)
        if subject.animal != obj.animal and len(subject.words) + len(obj.words) < MAX_WORDS
    ]


def _ability() -> list[tuple[str, ...]]:
    return [(*phrase.words, "can", ability) for phrase in noun_phrases() for ability in ABILITIES[phrase.animal]]


def _colour() -> list[tuple[str, ...]]:
    # Only size adjectives in the subject, so no sentence says "the red cat is blue".
    return [
        (*phrase.words, "are" if phrase.plural else "is", *negation, colour)
        for phrase, negation, colour in product(noun_phrases(SIZES), ((), ("not",)), COLOURS)
    ]


def _conjunction() -> list[tuple[str, ...]]:
    return [
        (*front, ANIMALS[first], "and", ANIMALS[second], "can", ability)
        for front, first, second in product(((), ("the",)), ANIMALS, ANIMALS)
        if first != second
        for ability in sorted(set(ABILITIES[first]) & set(ABILITIES[second]))
    ]


# Template -> (builder, share of draws); the small conjunction pool gets a small share.
TEMPLATES = {
    "transitive": (_transitive, 0.4),
    "ability": (_ability, 0.25),
    "colour": (_colour, 0.25),
    "conjunction": (_conjunction, 0.1),
}


@functools.cache  # ~460,000 sentences, about a second to list
def sentence_pools() -> dict[str, tuple[str, ...]]:
    """Enumerates every sentence of every template, written "The red cat sees two dogs."

    Returns:
        Template name -> its sentences with 3-6 words, in a fixed order.
    """
    pools = {}
    for name, (build, _) in TEMPLATES.items():
        texts = {" ".join(words) for words in build() if MIN_WORDS <= len(words) <= MAX_WORDS}
        pools[name] = tuple(sorted(text[0].upper() + text[1:] + "." for text in texts))
    return pools


def plan_split(
    rng: random.Random, pools: Mapping[str, Sequence[str]], split: str, n: int, distinct: bool
) -> list[Utterance]:
    """Draws n utterances: a template by its share, then a sentence, voice and speed.

    Args:
        rng: The source of randomness.
        pools: Template name -> the sentences it may draw from.
        split: "train" or "test", used in the ids.
        n: Number of utterances.
        distinct: Whether every sentence must differ (the test split); templates whose
            pool is used up are skipped.

    Returns:
        The utterances, ids ``{split}-00000`` onwards.

    Raises:
        ValueError: When ``distinct`` and the pools hold fewer than n sentences.
    """
    available = sum(len(pool) for pool in pools.values())
    if distinct and n > available:
        raise ValueError(f"only {available} distinct sentences exist, {n} asked")
    remaining = {name: list(pool) for name, pool in pools.items()}
    utterances = []
    for index in range(n):
        names = [name for name, pool in remaining.items() if pool]
        name = rng.choices(names, [TEMPLATES[name][1] for name in names])[0]
        pool = remaining[name]
        text = pool.pop(rng.randrange(len(pool))) if distinct else rng.choice(pool)
        voice = f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}"
        utterances.append(Utterance(f"{split}-{index:05d}", text, voice, rng.randint(MIN_SPEED, MAX_SPEED)))
    return utterances


def plan(n_train: int, n_test: int, seed: int) -> dict[str, list[Utterance]]:
    """Plans both splits; test sentences are held out of train.

    Each split has its own random stream, so growing ``n_train`` keeps the first
    train utterances and the whole test split unchanged.

    Args:
        n_train: Number of train utterances (sentences may repeat, with other voices).
        n_test: Number of test utterances, all with distinct sentences.
        seed: Random seed.

    Returns:
        ``{"train": [...], "test": [...]}``.
    """
    pools = sentence_pools()
    test = plan_split(random.Random(f"{seed}-test"), pools, "test", n_test, distinct=True)
    held_out = {u.text for u in test}
    train_pools = {name: [s for s in pool if s not in held_out] for name, pool in pools.items()}
    train = plan_split(random.Random(f"{seed}-train"), train_pools, "train", n_train, distinct=False)
    return {"train": train, "test": test}


def synthesize(utterance: Utterance, path: Path) -> float:
    """Speaks the utterance with espeak-ng and saves it as 16 kHz mono Ogg Opus.

    Args:
        utterance: What to say, the voice and speed.
        path: Destination file.

    Returns:
        The duration in seconds.
    """
    command = ["espeak-ng", "-v", utterance.voice, "-s", str(utterance.speed), "--stdout", utterance.text]
    wav = subprocess.run(command, check=True, capture_output=True).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    resampled = torchaudio.functional.resample(torch.from_numpy(samples), rate, SAMPLE_RATE).numpy()
    soundfile.write(path, resampled, SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=OPUS_COMPRESSION)
    return len(resampled) / SAMPLE_RATE


def generate(out: Path, n_train: int, n_test: int, seed: int) -> float:
    """Writes ``out/train.jsonl``, ``out/test.jsonl`` and ``out/audio/*.opus``.

    Args:
        out: Destination folder, created if missing.
        n_train: Number of train records.
        n_test: Number of test records.
        seed: Random seed; the same seed writes the same JSONL bytes.

    Returns:
        The total audio duration in seconds.
    """
    (out / "audio").mkdir(parents=True, exist_ok=True)
    total = 0.0
    for split, utterances in plan(n_train, n_test, seed).items():
        paths = [f"audio/{u.record_id}.opus" for u in utterances]
        with ThreadPoolExecutor(WORKERS) as pool:
            total += sum(pool.map(synthesize, utterances, [out / p for p in paths]))
        rows = [
            {"id": u.record_id, "audios": [p], "transcript": u.text, "voice": u.voice, "speed": u.speed}
            for u, p in zip(utterances, paths, strict=True)
        ]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return total


def main() -> None:
    """Parses the command line and generates the data set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/speech"))
    parser.add_argument("--train", type=int, default=2000, help="number of train records")
    parser.add_argument("--test", type=int, default=100, help="number of test records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit(
            "make_speech.py: espeak-ng not found; install it (Debian/Ubuntu: apt-get install espeak-ng, "
            "macOS: brew install espeak-ng). The bundled data/speech/ set needs no install."
        )
    seconds = generate(args.out, args.train, args.test, args.seed)
    print(f"{args.out}: {args.train} train + {args.test} test utterances, {seconds / 60:.1f} min of audio")


if __name__ == "__main__":
    main()
