"""BLSP-KD: aligned student/teacher data, the KD loss, where gradients go, text invariance."""

import numpy as np
import pytest
import soundfile as sf
import torch

import mmadapt
from mmadapt.adapters import adapter_parameters
from mmadapt.data import Collator
from mmadapt.data.tokenize import IGNORE_INDEX, SPEECH_SLOT, distillation_prompt, encode_distillation
from mmadapt.losses import distillation_kl
from mmadapt.modality import SPEECH
from tests.helpers import REPO

PROMPT = "Continue the following text in a coherent style: {transcript}"


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = mmadapt.load_config(REPO / "configs" / "blsp_kd.yaml", ["model=models/tiny.yaml", "adapters.0.dropout=0"])
    return mmadapt.build_model(cfg)


def _items(model, transcripts, response="a reply."):
    items = []
    for index, transcript in enumerate(transcripts):
        encoded = encode_distillation(model.tokenizer, transcript, response, PROMPT, system_prompt="")
        seconds = 0.3 + 0.2 * index
        waveform = torch.from_numpy(np.random.default_rng(index).normal(size=int(16000 * seconds)).astype(np.float32))
        items.append({
            "id": str(index),
            "input_ids": torch.tensor(encoded["input_ids"]),
            "labels": torch.tensor(encoded["labels"]),
            "teacher_input_ids": torch.tensor(encoded["teacher_input_ids"]),
            "teacher_labels": torch.tensor(encoded["teacher_labels"]),
            "speech_length": encoded["speech_length"],
            "images": torch.zeros(0, 3, 0, 0),
            "audios": [model.encoders["speech"].features(waveform * 0.1)],
        })
    return items


def _batch(model, transcripts=("the red cat", "two big dogs can run")):
    batch = Collator(model.tokenizer.pad_token_id)(_items(model, transcripts))
    return {k: v for k, v in batch.items() if k not in ("ids", "images")}


def test_teacher_sequence_is_student_with_transcript_in_the_slot(model):
    encoded = encode_distillation(model.tokenizer, "the red cat", "sat down.", PROMPT, system_prompt="")
    student, teacher = encoded["input_ids"], encoded["teacher_input_ids"]
    slot = student.index(SPEECH_SLOT)
    transcript = model.tokenizer(" the red cat", add_special_tokens=False)["input_ids"]
    assert encoded["speech_length"] == len(transcript)
    assert teacher == student[:slot] + transcript + student[slot + 1 :]
    response_labels = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert [label for label in encoded["teacher_labels"] if label != IGNORE_INDEX] == response_labels
    assert model.tokenizer.decode(response_labels).startswith("sat down.")
    prompt = distillation_prompt(model.tokenizer, "the red cat", PROMPT, system_prompt="")
    assert teacher[: len(prompt)] == prompt and encoded["teacher_labels"][len(prompt)] != IGNORE_INDEX


def test_kd_loss_is_zero_for_equal_inputs_and_positive_otherwise():
    logits = torch.randn(5, 11)
    assert distillation_kl(logits, logits.clone(), temperature=2.0) == 0
    assert distillation_kl(logits, torch.randn(5, 11), temperature=2.0) > 0


def test_student_fed_the_transcript_embeddings_matches_the_teacher(model, monkeypatch):
    """With PLoRA at its zero init and speech tokens equal to the transcript's embeddings,
    the student's input is the teacher's: the KD loss is exactly zero, and positive for
    any other speech tokens."""
    batch = _batch(model)
    model.train()
    teacher_ids = batch["teacher_input_ids"]
    embeddings = model.llm.get_input_embeddings()

    def transcript_tokens(speech):
        student_ids = batch["input_ids"]
        starts = (student_ids == SPEECH_SLOT).int().argmax(1)
        rows = [embeddings(teacher_ids[b, s : s + n]) for b, (s, n) in enumerate(zip(starts, speech.targets))]
        tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        return type("Cif", (), {"tokens": tokens, "lengths": speech.targets, "alpha_sum": speech.targets.float()})

    monkeypatch.setattr(model, "encode_speech", transcript_tokens)
    out = model(**batch, return_logits=False)
    assert out.parts["kd"].item() == 0 and out.parts["input_kl"].item() == 0
    assert out.counts["kd_top1"][0] == out.counts["kd_top1"][1] > 0
    monkeypatch.undo()
    out = model(**batch, return_logits=False)
    assert out.parts["kd"].item() > 0 and set(out.parts) == {"kd", "input_kl", "quantity"}


def test_gradients_reach_only_the_speech_parts(model):
    for param in model.parameters():
        param.requires_grad_(True)
    for param in model.llm.parameters():
        param.requires_grad_(False)
    for param in adapter_parameters(model.llm).values():
        param.requires_grad_(True)
    model.train()
    model(**_batch(model), return_logits=False).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    llm_base = {name for name, p in model.llm.named_parameters(prefix="llm") if ".mmadapt." not in name}
    assert not with_grad & llm_base
    assert not any(name.startswith(("encoders.image.", "projectors.image.")) for name in with_grad)
    for prefix in ("encoders.speech.", "projectors.speech.cformer.", "projectors.speech.projector."):
        assert any(name.startswith(prefix) for name in with_grad), prefix
    assert any(".mmadapt." in name for name in with_grad)


def test_text_only_logits_equal_the_base_llm_after_training_values(model):
    for param in adapter_parameters(model.llm).values():
        torch.nn.init.normal_(param, std=0.2)
    model.eval()
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad(), mmadapt.disable_adapters(model.llm):
        base = model.llm(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_eval_mode_uses_the_estimated_token_count(model):
    batch = _batch(model)
    model.eval()
    with torch.no_grad():
        out = model(**batch, return_logits=False)
    assert torch.isfinite(out.loss)
    hits, total = out.counts["cif_len_within1"]
    assert total == 2 and 0 <= hits <= 2
    assert out.counts["kd_top1"][1] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_speech_alignment_stage_needs_no_llm_pass(model, monkeypatch):
    batch = _batch(model)
    model.train()
    monkeypatch.setattr(model.llm.base_model, "forward", lambda *a, **k: pytest.fail("the LLM ran"))
    out = model(**batch, align=True)
    assert set(out.parts) == {"align", "quantity"} and out.loss > 0
    out.loss.backward()
    assert model.projectors["speech"].projector.layers[0].weight.grad is not None


def test_generate_from_speech(model, tmp_path):
    batch = Collator(model.tokenizer.pad_token_id, padding_side="left")(_items(model, ["the red cat"]))
    model.eval()
    tokens = model.generate(
        batch["input_ids"], batch["attention_mask"], audio_features=batch["audio_features"],
        audio_frames=batch["audio_frames"], max_new_tokens=3,
    )
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 3


def test_speech_record_dataset_end_to_end(model, tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.float32), 16000)
    (tmp_path / "train.jsonl").write_text(
        '{"id": "u1", "audios": ["a.wav"], "transcript": "the red cat", "response": "sat down."}\n'
    )
    cfg = mmadapt.load_config(REPO / "configs" / "blsp_kd.yaml", ["model=models/tiny.yaml"])
    from mmadapt.build import model_dataset

    dataset, skipped = model_dataset(cfg, model, str(tmp_path / "train.jsonl"))
    item = dataset[0]
    assert not skipped and item["speech_length"] == len(model.tokenizer(" the red cat")["input_ids"])
    assert item["audios"][0].shape[0] == 80 and len(item["teacher_input_ids"]) == len(item["input_ids"]) - 1 + item["speech_length"]
    assert (item["input_ids"] == -SPEECH).sum() == 1
