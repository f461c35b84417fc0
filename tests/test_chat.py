"""``mmadapt chat`` and ChatSession on a tiny BLSP-KD run trained once for the module."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import mmadapt
from mmadapt.cli import main
from mmadapt.data.audio import load_audio
from mmadapt.data.tokenize import encode_prompt
from mmadapt.errors import InputError
from mmadapt.inference.chat import ChatSession, TextStream
from mmadapt.tokenizers import byte_tokenizer
from tests.helpers import REPO, SHAPES, incomplete_run, run_of_another_base, train_env

# An untied output head makes greedy answers depend on the input; a tied random one
# mostly repeats the prompt's last token, which would make equality tests vacuous.
UNTIED = "model.llm.config.tie_word_embeddings=false"
RECORDS = [
    ("the red cat", "sat down."), ("two dogs run", "very fast."), ("a blue bird", "sings."),
    ("green frogs jump", "high."),
]


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory) -> dict[str, Path]:
    """Four BLSP-KD records with short noise clips, as train and eval set."""
    folder = tmp_path_factory.mktemp("speech")
    rng = np.random.default_rng(0)
    lines = []
    for i, (transcript, response) in enumerate(RECORDS):
        clip = (0.1 * rng.standard_normal(8000 + 2000 * i)).astype(np.float32)
        soundfile.write(folder / f"a{i}.wav", clip, 16000)
        record = {"id": f"u{i}", "audios": [f"a{i}.wav"], "transcript": transcript, "response": response}
        lines.append(json.dumps(record))
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    return {"records": folder / "records.jsonl", "wav": folder / "a0.wav", "other_wav": folder / "a2.wav"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, speech_files) -> Path:
    out = tmp_path_factory.mktemp("chat") / "run"
    records = speech_files["records"]
    command = [
        sys.executable, "train.py", "--config", "configs/blsp_kd.yaml", "model=models/tiny.yaml", UNTIED,
        "train.max_steps=2", "train.align_steps=1", "train.batch_size=2", "data.eval_samples=4",
        f"data.train={records}", f"data.eval={records}", f"train.output_dir={out}",
    ]
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(run):
    return mmadapt.load_trained(run), mmadapt.load_config(run / "config.yaml")


def _reference(trained, messages, wav, max_new_tokens) -> tuple[str, int]:
    """Greedy answer of ``model.generate`` on a prompt built by hand (no ChatSession)."""
    model, cfg = trained
    ids = torch.tensor([encode_prompt(model.tokenizer, messages, 0, cfg.data.system_prompt)])
    features = model.encoders["speech"].features(load_audio(wav))  # (mels, F)
    frames = torch.tensor([features.shape[1]])
    tokens = model.generate(ids, audio_features=features[None], audio_frames=frames, max_new_tokens=max_new_tokens)
    tokens = tokens[0].tolist()
    tokens = [t for t in tokens if t != model.tokenizer.eos_token_id]
    return model.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def _chat(run, *args: str) -> int:
    return main(["chat", "--checkpoint", str(run), *args])


def test_audio_alone_is_the_instruction_and_matches_greedy_generate(run, trained, speech_files, capsys):
    expected, n = _reference(trained, [{"role": "user", "content": "<speech>"}], speech_files["wav"], 12)
    assert _chat(run, "--audio", str(speech_files["wav"]), "--max-new-tokens", "12") == 0
    assert n > 0 and capsys.readouterr().out == expected + "\n"
    # The prompt's logits depend on the audio, so the comparison above checks the speech reached the model.
    first, second = (_prompt_logits(trained, speech_files[name]) for name in ("wav", "other_wav"))
    assert not torch.allclose(first, second)


def _prompt_logits(trained, wav) -> torch.Tensor:
    model, cfg = trained
    ids = torch.tensor([encode_prompt(model.tokenizer, [{"role": "user", "content": "<speech>"}], 0, cfg.data.system_prompt)])
    features = model.encoders["speech"].features(load_audio(wav))
    with torch.no_grad():
        return model(ids, audio_features=features[None], audio_frames=torch.tensor([features.shape[1]])).logits[0, -1]


def test_json_prints_answer_and_token_count(run, trained, speech_files, capsys):
    messages = [{"role": "user", "content": "<speech>\nRepeat it."}]
    expected, n = _reference(trained, messages, speech_files["wav"], 10)
    args = ["--audio", str(speech_files["wav"]), "--text", "Repeat it.", "--json", "--max-new-tokens", "10"]
    assert _chat(run, *args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"answer": expected, "tokens": n}
    assert 0 < n <= 10


def _spy_on_generate(session: ChatSession, monkeypatch) -> list[dict]:
    calls = []
    generate = session.model.generate

    def spy(**inputs):
        calls.append(inputs)
        return generate(**inputs)

    monkeypatch.setattr(session.model, "generate", spy)
    return calls


def test_follow_up_prompt_holds_the_earlier_turn_and_its_audio(run, speech_files, monkeypatch):
    session = ChatSession.from_run(run)
    calls = _spy_on_generate(session, monkeypatch)
    first, _ = session.ask(audios=[speech_files["wav"]], max_new_tokens=4)
    second, _ = session.ask("And then?", max_new_tokens=4)
    expected_messages = [
        {"role": "user", "content": "<speech>"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    assert session.messages == [*expected_messages, {"role": "assistant", "content": second}]
    prompts = [call["input_ids"][0].tolist() for call in calls]
    assert prompts[1] == encode_prompt(session.model.tokenizer, expected_messages, 0, session.system_prompt)
    assert prompts[1][: len(prompts[0])] == prompts[0]
    assert torch.equal(calls[1]["audio_features"], calls[0]["audio_features"])


def test_interactive_answers_follow_ups_until_an_empty_line(run, speech_files, capsys, monkeypatch):
    session = ChatSession.from_run(run)
    expected = [session.ask(audios=[speech_files["wav"]], max_new_tokens=4), session.ask("And then?", max_new_tokens=4)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("And then?\n\nnot read\n"))
    assert _chat(run, "--audio", str(speech_files["wav"]), "--interactive", "--json", "--max-new-tokens", "4") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"answer": answer, "tokens": n} for answer, n in expected]


def test_interactive_without_a_first_turn_reads_stdin_until_exit(run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("exit\nnot read\n"))
    assert _chat(run, "--interactive", "--json") == 0
    assert capsys.readouterr().out == ""


def test_streamed_pieces_concatenate_to_the_answer(run, speech_files):
    session = ChatSession.from_run(run)
    greedy = []
    answer, n = session.ask(audios=[speech_files["wav"]], max_new_tokens=8, on_text=greedy.append)
    assert "".join(greedy) == answer and len(greedy) > 1
    torch.manual_seed(0)  # random bytes: invalid and multi-byte UTF-8 sequences included
    sampled = []
    answer, n = session.ask("More.", max_new_tokens=16, do_sample=True, temperature=5.0, on_text=sampled.append)
    assert "".join(sampled) == answer and n > 1


def test_text_stream_holds_back_split_characters():
    tokenizer = byte_tokenizer()
    text = "héllo ☃ wörld"
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:  # one token per byte
        stream.push(token)
    stream.finish()
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) == len(text)  # each character once complete, never a part of one


def _not_audio(folder: Path) -> Path:
    (folder / "noise.wav").write_bytes(b"not a wav file at all")
    return folder / "noise.wav"


def _not_image(folder: Path) -> Path:
    (folder / "picture.png").write_text("not a png")
    return folder / "picture.png"


@pytest.mark.parametrize(
    "make_args, named",
    [
        (lambda run, tmp: ["--checkpoint", str(run), "--image", str(tmp / "none.png")], "none.png"),
        (lambda run, tmp: ["--checkpoint", str(run), "--image", str(_not_image(tmp))], "picture.png"),
        (lambda run, tmp: ["--checkpoint", str(run), "--audio", str(tmp / "none.wav")], "none.wav"),
        (lambda run, tmp: ["--checkpoint", str(run), "--audio", str(_not_audio(tmp))], "noise.wav"),
        (lambda run, tmp: ["--checkpoint", str(incomplete_run(run, tmp / "half")), "--text", "hi"], "half"),
        (lambda run, tmp: ["--checkpoint", str(run_of_another_base(run, tmp / "other")), "--text", "hi"], "other"),
        (lambda run, tmp: ["--checkpoint", str(run)], "nothing to answer"),
        (lambda run, tmp: ["--checkpoint", str(run), "--text", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
    ids=[
        "missing-image", "unreadable-image", "missing-audio", "unreadable-audio", "incomplete-run", "other-base",
        "no-input", "no-tokens",
    ],
)
def test_bad_input_exits_2_with_one_line_naming_it(run, tmp_path, capsys, make_args, named):
    assert main(["chat", *make_args(run, tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and named in captured.err


@pytest.fixture(scope="module")
def image_session() -> ChatSession:
    """An untrained image-only model (no speech encoder): the mechanics need no training."""
    overrides = ["model=models/tiny.yaml", UNTIED, "model.speech=null"]
    cfg = mmadapt.load_config(REPO / "configs" / "xcomposer.yaml", overrides)
    return ChatSession(mmadapt.build_model(cfg).eval(), cfg.data.system_prompt)


def test_image_turns_feed_every_image_in_placeholder_order(image_session, monkeypatch):
    session = ChatSession(image_session.model, image_session.system_prompt)
    calls = _spy_on_generate(session, monkeypatch)
    pictures = [SHAPES / "images" / "train-00000.png", SHAPES / "images" / "train-00001.png"]
    session.ask("Describe the picture.", images=pictures[:1], max_new_tokens=4)
    session.ask("And this one?", images=pictures[1:], max_new_tokens=4)
    encoder = session.model.encoders["image"]
    expected = []
    for picture in pictures:
        with Image.open(picture) as image:
            expected.append(encoder.preprocess(image))
    assert torch.equal(calls[1]["images"], torch.stack(expected))
    ids = calls[1]["input_ids"][0]
    assert int((ids == -mmadapt.IMAGE).sum()) == 2 * encoder.num_tokens
    first_turn = [{"role": "user", "content": "<image>\nDescribe the picture."}]
    prompt = encode_prompt(session.model.tokenizer, first_turn, encoder.num_tokens, session.system_prompt)
    first_image = torch.stack(expected[:1])
    reference = session.model.generate(input_ids=torch.tensor([prompt]), images=first_image, max_new_tokens=4)
    first_answer = session.model.tokenizer.decode(reference[0].tolist(), skip_special_tokens=True)
    assert session.messages[1]["content"] == first_answer


@pytest.mark.parametrize(
    "turn, named",
    [
        ({"audios": ["question.wav"]}, "no speech encoder"),
        ({"text": "What is <image> here?"}, "placeholder"),
        ({}, "nothing to answer"),
    ],
)
def test_session_refuses_input_it_cannot_use_and_keeps_the_conversation(image_session, turn, named):
    session = ChatSession(image_session.model, image_session.system_prompt)
    with pytest.raises(InputError, match=named):
        session.ask(**turn, max_new_tokens=2)
    assert session.messages == [] and session.images == []
