import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "speech"
_spec = importlib.util.spec_from_file_location("make_speech", ROOT / "data" / "make_speech.py")
make_speech = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_speech)

SINGULAR_VERBS = {*make_speech.VERBS, "is"}
PLURAL_VERBS = {*make_speech.VERBS.values(), "are"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def bundled() -> dict[str, list[dict]]:
    return {split: _read(BUNDLED / f"{split}.jsonl") for split in ("train", "test")}


def _words(transcript: str) -> list[str]:
    return transcript.removesuffix(".").lower().split()


def test_records_follow_schema(bundled):
    train, test = bundled["train"], bundled["test"]
    assert (len(train), len(test)) == (2000, 100)
    assert [r["id"] for r in train] == [f"train-{i:05d}" for i in range(2000)]
    assert [r["id"] for r in test] == [f"test-{i:05d}" for i in range(100)]
    for record in train + test:
        assert set(record) == {"id", "audios", "transcript", "voice", "speed", "response"}
        assert record["response"].strip()  # the teacher's continuation, from data/make_responses.py
        assert record["audios"] == [f"audio/{record['id']}.opus"]
        accent, variant = record["voice"].split("+")
        assert accent in make_speech.ACCENTS and variant in make_speech.VARIANTS
        assert make_speech.MIN_SPEED <= record["speed"] <= make_speech.MAX_SPEED
    # Every voice and a spread of speeds are used.
    assert len({r["voice"] for r in train}) == len(make_speech.ACCENTS) * len(make_speech.VARIANTS)
    assert len({r["speed"] for r in train}) > 50


def test_transcripts_are_short_sentences_over_the_vocabulary(bundled):
    assert 40 <= len(make_speech.VOCABULARY) <= 60
    for record in bundled["train"] + bundled["test"]:
        text = record["transcript"]
        assert re.fullmatch(r"[A-Z][a-z ]+\.", text), record["id"]
        words = _words(text)
        assert 3 <= len(words) <= 6, record["id"]
        assert set(words) <= make_speech.VOCABULARY, record["id"]
        # Subject-verb agreement: "A ..." takes a singular verb, "Two ..." a plural one.
        if words[0] == "a":
            assert not set(words) & PLURAL_VERBS, text
        if words[0] in make_speech.NUMBERS:
            assert not set(words) & SINGULAR_VERBS, text


def test_test_sentences_are_held_out(bundled):
    train_sentences = {r["transcript"] for r in bundled["train"]}
    test_sentences = [r["transcript"] for r in bundled["test"]]
    assert len(set(test_sentences)) == len(test_sentences)
    assert not train_sentences & set(test_sentences)
    assert len(train_sentences) > 1000  # repeats are rare


def test_audio_is_readable_speech(bundled):
    records = bundled["train"] + bundled["test"]
    for record in records:
        info = soundfile.info(BUNDLED / record["audios"][0])
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "OGG", "OPUS"), record["id"]
        assert 0.5 < info.frames / info.samplerate <= 10, record["id"]
    # Decoding all 2100 files takes ~20 s; every tenth is a fair check that they decode.
    for record in records[::10]:
        samples, rate = soundfile.read(BUNDLED / record["audios"][0], dtype="float32")
        assert (rate, samples.ndim) == (16000, 1), record["id"]
        assert 0.5 < len(samples) / rate <= 10, record["id"]
        assert np.abs(samples).max() > 0.05, record["id"]  # not silent


def test_bundled_set_is_small():
    assert sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file()) <= 15_000_000


def test_bundled_set_is_what_the_script_plans(bundled):
    planned = make_speech.plan(n_train=2000, n_test=100, seed=0)
    for split, records in bundled.items():
        assert [(u.record_id, u.text, u.voice, u.speed) for u in planned[split]] == [
            (r["id"], r["transcript"], r["voice"], r["speed"]) for r in records
        ]


def test_plan_is_seeded_and_grows_by_appending():
    small, large = make_speech.plan(30, 5, seed=1), make_speech.plan(60, 5, seed=1)
    assert large["test"] == small["test"]
    assert large["train"][:30] == small["train"]
    assert make_speech.plan(30, 5, seed=2)["train"] != small["train"]


def test_distinct_plan_refuses_more_sentences_than_exist():
    pools = {"transitive": ["One.", "Two."], "ability": ["Three."]}
    utterances = make_speech.plan_split(random.Random(0), pools, "test", 3, distinct=True)
    assert sorted(u.text for u in utterances) == ["One.", "Three.", "Two."]
    with pytest.raises(ValueError, match="only 3 distinct sentences exist, 4 asked"):
        make_speech.plan_split(random.Random(0), pools, "test", 4, distinct=True)
