"""Tests for mmadapt.llm (model loading, fingerprint) and mmadapt.tokenizers."""

from __future__ import annotations

import pydantic
import pytest
import torch

from mmadapt.llm import LLMConfig, base_fingerprint, load_llm
from mmadapt.tokenizers import byte_tokenizer

TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def tiny_cfg(arch: str = "llama", **extra) -> LLMConfig:
    return LLMConfig(source="random", arch=arch, config=TINY[arch], **extra)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", sorted(TINY))
def test_random_model_is_seeded_and_leaves_global_rng_alone(arch):
    rng_before = torch.get_rng_state()
    first, again, other = (load_llm(tiny_cfg(arch), seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before)

    assert first.pretrained_source is None
    assert first.model.config.model_type == arch
    assert first.model.get_input_embeddings().num_embeddings == len(first.tokenizer) == 259
    ids = torch.tensor([[1, 40, 50, 60, 2]])
    assert torch.equal(logits(first.model, ids), logits(again.model, ids))
    assert not torch.equal(logits(first.model, ids), logits(other.model, ids))
    assert all(p.dtype == torch.float32 for p in first.model.parameters())


def test_random_model_gets_the_tokenizer_special_ids():
    config = load_llm(tiny_cfg()).model.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_pretrained_folder_round_trip(tmp_path):
    saved = load_llm(tiny_cfg(), seed=7)
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)

    loaded = load_llm(LLMConfig(source="pretrained", path=str(tmp_path)))
    assert loaded.model.training
    ids = torch.tensor([[1, 10, 20, 30, 40, 2]])
    assert torch.equal(logits(saved.model, ids), logits(loaded.model, ids))
    assert loaded.pretrained_source == str(tmp_path)
    assert loaded.tokenizer.chat_template == saved.tokenizer.chat_template
    assert loaded.tokenizer.pad_token == "<|im_end|>"


def test_missing_pretrained_folder_names_key_and_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"llm\.path.*no-such-model.*local disk"):
        load_llm(LLMConfig(source="pretrained", path=str(missing)))


def test_bad_inputs_give_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"llm\.path: required"):
        load_llm(LLMConfig(source="pretrained"))
    with pytest.raises(FileNotFoundError, match=r"llm\.tokenizer.*nowhere"):
        load_llm(tiny_cfg(tokenizer=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"llm\.tokenizer: .* 259 tokens .* only 100"):
        load_llm(LLMConfig(source="random", config=TINY["llama"] | {"vocab_size": 100}))
    with pytest.raises(ValueError, match=r"llm\.arch='no_such_arch'"):
        load_llm(LLMConfig(source="random", arch="no_such_arch"))
    with pytest.raises(pydantic.ValidationError, match="pth"):
        LLMConfig(source="pretrained", pth="x")


def test_tokenizer_folder_without_chat_template_is_refused(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"llm\.tokenizer: .* has no chat_template"):
        load_llm(tiny_cfg(tokenizer=str(tmp_path)))


ROUND_TRIP = ["plain ascii", " leading  and trailing spaces \n\t", "héllo wörld 🚀 日本語 Ωμέγα", ""]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_byte_tokenizer_round_trips_exactly(text):
    tokenizer = byte_tokenizer()
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_special_tokens():
    tokenizer = byte_tokenizer()
    assert len(tokenizer) == 259
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer("a<|im_end|>").input_ids[-1] == 2


def test_byte_tokenizer_chat_template_matches_smollm2_layout():
    tokenizer = byte_tokenizer()
    default_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    chat = [{"role": "user", "content": "Hi é"}, {"role": "assistant", "content": "Hello!"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered == default_system + "<|im_start|>user\nHi é<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"

    own_system = [{"role": "system", "content": "Be brief."}, chat[0]]
    rendered = tokenizer.apply_chat_template(own_system, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi é<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(own_system, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == rendered


def test_fingerprint_is_stable_and_sees_one_weight_change():
    model = load_llm(tiny_cfg(), seed=0).model
    fingerprint = base_fingerprint(model)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert base_fingerprint(load_llm(tiny_cfg(), seed=0).model) == fingerprint

    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    assert base_fingerprint(model) != fingerprint


@pytest.mark.smollm2
def test_smollm2_loads_trains_and_answers():
    llm = load_llm(LLMConfig(source="smollm2"))
    model, tokenizer = llm.model, llm.tokenizer
    assert llm.pretrained_source == "smollm2:SmolLM2-135M-Instruct.Q4_1"
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert getattr(model, "hf_quantizer", None) is None

    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    model.eval()
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
