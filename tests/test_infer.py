"""``mmadapt infer`` and ``mmadapt.inference.batch`` on a tiny run trained once for the module.

The run is the xcomposer recipe on ``models/tiny.yaml``, which has an image and a speech
encoder sharing one PLoRA adapter, so after a few image steps its adapter is non-zero on
speech rows too, and one model answers image, speech and text-only requests.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mmadapt.cli import main
from mmadapt.data.tokenize import IGNORE_INDEX, encode_distillation, encode_prompt
from mmadapt.errors import InputError
from mmadapt.inference import batch
from mmadapt.inference.batch import answer_requests, read_requests, resume_output
from mmadapt.inference.prompts import answer_tokens, decode, load_run
from tests.helpers import (
    SHAPES, assert_same_greedy, incomplete_run, one_thread, run_of_another_base, run_train, shapes_subset,  # noqa: F401
    tiny_overrides,
)

UNTIED = "model.llm.config.tie_word_embeddings=false"  # greedy answers depend on the input (see test_chat.py)
MAX_NEW_TOKENS = 12
# The run's CFormer is untrained: 0.1 alpha per 20 ms frame, so a 1.1 s clip sums to 5.5, a tie
# the CIF count rounds either way with the summation order; these lengths stay clear of ties.
CLIP_SECONDS = (0.46, 0.66, 0.86, 1.06, 1.26)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Path:
    folder = tmp_path_factory.mktemp("infer")
    data = shapes_subset(folder / "data", n_train=16, n_test=4)
    overrides = tiny_overrides(
        data, folder / "run", UNTIED, "train.max_steps=3", "train.lr=0.01", "train.warmup_steps=0", "data.eval_samples=4"
    )
    result = run_train(overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


@pytest.fixture(scope="module")
def loaded(run):
    """The run on the device ``mmadapt infer`` picks, so in-process answers match the CLI's."""
    return load_run(run)


def _files(folder: Path) -> None:
    """Shapes images and noise clips of different lengths, referenced relative to ``folder``."""
    (folder / "images").mkdir(parents=True)
    for i in range(6):
        shutil.copy(SHAPES / "images" / f"test-{i:05d}.png", folder / "images" / f"{i}.png")
    (folder / "audio").mkdir()
    rng = np.random.default_rng(0)
    for i, seconds in enumerate(CLIP_SECONDS):
        clip = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
        soundfile.write(folder / "audio" / f"{i}.wav", clip, 16000)


def _conversation(request_id: str, turns: list[str], images=(), audios=(), answer: str | None = None) -> dict:
    """A request whose user/assistant turns alternate, ending with a user turn or with ``answer``."""
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": role, "content": text} for role, text in zip(roles, turns)]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"id": request_id, "messages": messages, "images": list(images), "audios": list(audios)}


def mixed_requests() -> list[dict]:
    """32 requests: image, speech, image+speech, text-only and transcript records of different
    lengths, single- and multi-turn, ending with a user or an assistant turn, shuffled."""
    requests = [
        _conversation(f"img{i}", ["<image>\nDescribe the picture."], [f"images/{i}.png"], answer="A red circle.")
        for i in range(6)
    ]
    requests += [
        _conversation("img-question", ["<image>\nWhat colour is the first shape?"], ["images/1.png"]),
        _conversation("img-two", ["<image><image>\nWhich picture has more shapes?"], ["images/2.png", "images/3.png"]),
        _conversation("img-follow-up", ["<image>\nDescribe it.", "Shapes.", "And their colours?"], ["images/4.png"]),
        _conversation("img-system", ["<image>"], ["images/5.png"]),
    ]
    requests[-1]["messages"].insert(0, {"role": "system", "content": "Answer in one word."})
    requests += [_conversation(f"speech{i}", ["<speech>"], audios=[f"audio/{i}.wav"]) for i in range(len(CLIP_SECONDS))]
    requests += [
        _conversation("speech-text", ["<speech>\nRepeat it, please."], audios=["audio/1.wav"], answer="It."),
        _conversation("speech-two", ["<speech> then <speech>"], audios=["audio/2.wav", "audio/3.wav"]),
        _conversation("speech-follow-up", ["<speech>", "Yes.", "Why?"], audios=["audio/4.wav"]),
        {"id": "transcript0", "audios": ["audio/0.wav"], "transcript": "the red cat", "response": "sat down."},
        {"id": "transcript1", "audios": ["audio/3.wav"], "transcript": "a blue bird", "response": "sings."},
        _conversation("mixed0", ["<image>\n<speech>\nAnswer the question about the picture."],
                      ["images/0.png"], ["audio/2.wav"]),
        _conversation("mixed1", ["<speech><image>"], ["images/3.png"], ["audio/4.wav"], answer="Two."),
    ]
    texts = ["Hi.", "Name three colours.", "Write one long sentence about a red circle above a blue square.",
             "What is two plus two?", "Say yes.", "Count to five, slowly, one number per word.",
             "Why is the sky blue?", "Tell me a story about a green triangle and a yellow square."]
    requests += [_conversation(f"text{i}", [text]) for i, text in enumerate(texts)]
    requests += [
        _conversation("text-follow-up", ["Hello.", "Hi!", "How are you?"]),
        _conversation("text-answered", ["Name a shape."], answer="A square."),
    ]
    assert len(requests) == 32
    random.Random(0).shuffle(requests)
    return requests


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("requests")
    _files(folder)
    return _write_jsonl(folder / "requests.jsonl", mixed_requests())


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answer_recording(loaded, requests, output: Path, batch_size: int, monkeypatch) -> dict[str, tuple[dict, list]]:
    """``answer_requests`` with every prompt item and its answer tokens recorded by id."""
    model, _ = loaded
    recorded = {}

    def recording(model, items, **settings):
        answers = answer_tokens(model, items, **settings)
        recorded.update({item["id"]: (item, tokens) for item, tokens in zip(items, answers)})
        return answers

    monkeypatch.setattr(batch, "answer_tokens", recording)
    answer_requests(model, requests, output, batch_size=batch_size, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    monkeypatch.undo()
    return recorded


def test_batches_of_8_answer_like_one_at_a_time(loaded, requests_file, tmp_path, monkeypatch):
    model, cfg = loaded
    requests = read_requests(requests_file, model, cfg.data)
    batched = _answer_recording(loaded, requests, tmp_path / "batched.jsonl", 8, monkeypatch)
    single = _answer_recording(loaded, requests, tmp_path / "single.jsonl", 1, monkeypatch)
    for request in requests:
        item, expected = single[request.id]
        assert_same_greedy(model, item, expected, batched[request.id][1], f"request {request.id}, batch 8 vs 1")
    for output, recorded in ((tmp_path / "batched.jsonl", batched), (tmp_path / "single.jsonl", single)):
        expected_rows = [
            {"id": r.id, "answer": decode(model.tokenizer, recorded[r.id][1]), "tokens": len(recorded[r.id][1])}
            for r in requests
        ]
        assert _rows(output) == expected_rows
    # Guards: the batches mix modalities, and the answers depend on the request.
    first_batch = requests[:8]
    assert any(r.images for r in first_batch) and any(r.audios for r in first_batch)
    assert any(not r.images and not r.audios for r in first_batch)
    assert len({tuple(tokens) for _, tokens in single.values()}) >= 16


def test_speech_prompts_of_one_token_length_batch_like_single(loaded, tmp_path, monkeypatch):
    """Equal prompts need no padding until their speech expands to different lengths."""
    model, cfg = loaded
    _files(tmp_path)
    rows = [_conversation(f"s{i}", ["<speech>"], audios=[f"audio/{i}.wav"]) for i in range(len(CLIP_SECONDS))]
    requests = read_requests(_write_jsonl(tmp_path / "requests.jsonl", rows), model, cfg.data)
    batched = _answer_recording(loaded, requests, tmp_path / "batched.jsonl", len(requests), monkeypatch)
    single = _answer_recording(loaded, requests, tmp_path / "single.jsonl", 1, monkeypatch)
    for request in requests:
        item, expected = single[request.id]
        assert_same_greedy(model, item, expected, batched[request.id][1], f"request {request.id}, batch vs 1")


def test_prompt_is_the_conversation_before_its_last_assistant_turn(loaded, tmp_path):
    model, cfg = loaded
    turns = ["<image>\nDescribe it.", "Shapes.", "And their colours?"]
    rows = [
        _conversation("open", turns, [str(SHAPES / "images" / "test-00000.png")]),
        _conversation("answered", turns, [str(SHAPES / "images" / "test-00000.png")], answer="Red."),
        {"id": "kd", "audios": [str(tmp_path / "a.wav")], "transcript": "the red cat", "response": "sat."},
    ]
    soundfile.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.float32), 16000)
    open_ended, answered, transcript = read_requests(_write_jsonl(tmp_path / "r.jsonl", rows), model, cfg.data)
    messages = rows[0]["messages"]
    image_tokens = model.encoders["image"].num_tokens
    assert open_ended.input_ids == answered.input_ids
    assert answered.input_ids == encode_prompt(model.tokenizer, messages, image_tokens, cfg.data.system_prompt)
    student = encode_distillation(model.tokenizer, "the red cat", "sat.", cfg.data.speech_prompt, cfg.data.system_prompt)
    first_label = next(i for i, label in enumerate(student["labels"]) if label != IGNORE_INDEX)
    assert transcript.input_ids == student["input_ids"][:first_label]


def _infer(run: Path, requests: Path, output: Path, *args: str) -> int:
    argv = ["infer", "--checkpoint", str(run), "--input", str(requests), "--output", str(output)]
    return main([*argv, "--max-new-tokens", str(MAX_NEW_TOKENS), *args])


def test_cli_answers_every_request_in_file_order(run, loaded, requests_file, tmp_path, capsys):
    model, cfg = loaded
    expected = tmp_path / "expected.jsonl"
    requests = read_requests(requests_file, model, cfg.data)
    answer_requests(model, requests, expected, batch_size=8, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    assert _infer(run, requests_file, tmp_path / "answers.jsonl") == 0
    assert capsys.readouterr().out == ""
    rows = _rows(tmp_path / "answers.jsonl")
    assert rows == _rows(expected)
    assert [row["id"] for row in rows] == [request["id"] for request in mixed_requests()]


def test_resume_keeps_answered_ids_cuts_a_torn_line_and_completes_the_rest(run, loaded, requests_file, tmp_path):
    model, cfg = loaded
    requests = read_requests(requests_file, model, cfg.data)
    done = 5
    expected = tmp_path / "expected.jsonl"
    answer_requests(model, requests[:done], expected, batch_size=8, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    # The rest in the batches a resumed run forms, so its answers are bit for bit these.
    answer_requests(model, requests[done:], expected, batch_size=8, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    lines = expected.read_text().splitlines(keepends=True)
    output = tmp_path / "answers.jsonl"
    output.write_text("".join(lines[:done]) + lines[done][: len(lines[done]) // 2])  # killed while writing
    assert _infer(run, requests_file, output) == 0
    assert output.read_text() == expected.read_text()
    assert _infer(run, requests_file, output) == 0  # nothing left to answer
    assert output.read_text() == expected.read_text()


def test_resume_refuses_an_output_that_is_not_answer_rows(tmp_path):
    output = tmp_path / "answers.jsonl"
    output.write_text('{"id": "a", "answer": "x"}\nnot json\n{"id": "b"')
    with pytest.raises(InputError, match=f"{output}:2"):
        resume_output(output)
    output.write_text('{"id": "a", "answer": "x"}\n{"id": "b", "answer": "y"}\n{"id": "c", "ans')
    assert resume_output(output) == {"a", "b"}
    assert output.read_text().endswith('"y"}\n')


def _image_request(request_id: str, image: str) -> dict:
    return _conversation(request_id, ["<image>\nDescribe the picture."], [image])


def _bad_requests(tmp: Path, case: str) -> Path:
    """A requests file whose third line (id 'r2' unless said otherwise) has the problem ``case``."""
    shutil.copy(SHAPES / "images" / "test-00000.png", tmp / "ok.png")
    (tmp / "noise.wav").write_bytes(b"not a wav file at all")
    bad = {
        "missing-image": _image_request("r2", "gone.png"),
        "unreadable-audio": _conversation("r2", ["<speech>"], audios=["noise.wav"]),
        "duplicate-id": _image_request("r0", "ok.png"),
        "no-id": {k: v for k, v in _image_request("r2", "ok.png").items() if k != "id"},
    }[case]
    return _write_jsonl(tmp / "requests.jsonl", [_image_request("r0", "ok.png"), _image_request("r1", "ok.png"), bad])


@pytest.mark.parametrize(
    "case, named",
    [
        ("missing-image", ["requests.jsonl:3", "'r2'", "gone.png", "not found"]),
        ("unreadable-audio", ["requests.jsonl:3", "'r2'", "noise.wav", "not a readable audio file"]),
        ("duplicate-id", ["requests.jsonl:3", "'r0'", "appears earlier"]),
        ("no-id", ["requests.jsonl:3", "'id' must be a non-empty string"]),
    ],
)
def test_bad_request_exits_2_with_one_line_naming_file_line_and_id(run, tmp_path, capsys, case, named):
    assert _infer(run, _bad_requests(tmp_path, case), tmp_path / "answers.jsonl") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert all(part in captured.err for part in named), captured.err
    assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.parametrize(
    "make_run, named",
    [(incomplete_run, "is not a finished mmadapt run"), (run_of_another_base, "the base model changed")],
    ids=["incomplete-run", "other-base"],
)
def test_unusable_checkpoint_exits_2_with_one_line_naming_it(run, requests_file, tmp_path, capsys, make_run, named):
    checkpoint = make_run(run, tmp_path / "checkpoint")
    assert _infer(checkpoint, requests_file, tmp_path / "answers.jsonl") == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert str(checkpoint) in captured.err and named in captured.err


def test_bad_numbers_exit_2(run, requests_file, tmp_path, capsys):
    assert _infer(run, requests_file, tmp_path / "a.jsonl", "--batch-size", "0") == 2
    assert "--batch-size" in capsys.readouterr().err
