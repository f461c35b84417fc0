import pytest
import torch

from mmadapt.adapters import adapter_parameters, disable_adapters, inject, modality_ids
from mmadapt.compat import set_activation_checkpointing
from mmadapt.modality import IMAGE, TEXT
from tests.conftest import tiny_causal_lm

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model):
    torch.manual_seed(1)
    for p in adapter_parameters(model).values():
        torch.nn.init.normal_(p, std=0.2)


def _image_ids(batch=2, length=10):
    ids = torch.full((batch, length), TEXT)
    ids[:, 2:6] = IMAGE
    return ids


def test_targets_and_zero_init_equals_base(causal_lm):
    tokens = torch.randint(0, 97, (2, 10))
    base = causal_lm(input_ids=tokens).logits
    placed = inject(causal_lm, [{"type": "plora", "modalities": ["image"], "targets": ALL_PROJ, "r": 4}])
    assert len(placed["plora"]) == 2 * 7
    with modality_ids(causal_lm, _image_ids()):
        assert torch.equal(causal_lm(input_ids=tokens).logits, base)


def test_text_only_logits_bit_identical_after_training_values(causal_lm):
    tokens = torch.randint(0, 97, (2, 10))
    base = causal_lm(input_ids=tokens).logits
    inject(causal_lm, [{"type": "plora", "targets": ALL_PROJ, "r": 4}])
    _randomize(causal_lm)
    assert torch.equal(causal_lm(input_ids=tokens).logits, base)
    with modality_ids(causal_lm, torch.zeros(2, 10, dtype=torch.long)):
        assert torch.equal(causal_lm(input_ids=tokens).logits, base)
    with modality_ids(causal_lm, _image_ids()):
        adapted = causal_lm(input_ids=tokens).logits
        with disable_adapters(causal_lm):
            assert torch.equal(causal_lm(input_ids=tokens).logits, base)
    assert not torch.allclose(adapted, base)
    # Causal attention: text positions before the first image token are untouched.
    assert torch.equal(adapted[:, :2], base[:, :2])


def test_low_rank_path_matches_dense_reference():
    model = tiny_causal_lm()
    inject(model, [{"type": "plora", "targets": ["q_proj"], "r": 4, "alpha": 8}])
    _randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.mmadapt["plora"]
    x = torch.randn(2, 10, 32)
    ids = _image_ids()
    with modality_ids(model, ids):
        got = layer(x)
    delta_w = adapter.lora_B.weight @ adapter.lora_A.weight * 2.0
    expected = x @ layer.weight.T + (ids == IMAGE).unsqueeze(-1) * (x @ delta_w.T)
    torch.testing.assert_close(got, expected)


def _grads(model, tokens, ids, labels):
    model.zero_grad()
    with modality_ids(model, ids):
        loss = model(input_ids=tokens, labels=labels).loss
    # backward after the block exited and after another forward with other ids
    with modality_ids(model, torch.zeros_like(ids)), torch.no_grad():
        model(input_ids=tokens)
    loss.backward()
    return {n: p.grad.clone() for n, p in adapter_parameters(model).items()}


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_same_grads_with_frozen_base(reentrant):
    model = tiny_causal_lm().train()
    inject(model, [{"type": "plora", "targets": ALL_PROJ, "r": 4}])
    _randomize(model)
    for name, p in model.named_parameters():
        p.requires_grad_("mmadapt" in name)
    tokens = torch.randint(0, 97, (2, 10))
    ids = _image_ids()
    reference = _grads(model, tokens, ids, tokens)
    set_activation_checkpointing(model, use_reentrant=reentrant)
    checkpointed = _grads(model, tokens, ids, tokens)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        assert checkpointed[name].abs().sum() > 0 or reference[name].abs().sum() == 0
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-7)


def test_unknown_target_and_type_errors():
    model = tiny_causal_lm()
    with pytest.raises(ValueError, match="match no linear layer"):
        inject(model, [{"type": "plora", "targets": ["qkv"]}])
    with pytest.raises(ValueError, match="did you mean 'plora'"):
        inject(model, [{"type": "plor"}])
    with pytest.raises(ValueError, match="flora_opt"):
        inject(model, [{"type": "flora"}])


def test_regex_targets():
    model = tiny_causal_lm()
    placed = inject(model, [{"type": "plora", "targets": [r"re:model\.layers\.0\..*_proj"]}])
    assert len(placed["plora"]) == 7


def test_text_modality_adapter_is_plain_lora_on_every_row():
    model = tiny_causal_lm()
    inject(model, [{"type": "plora", "modalities": ["text"], "targets": ["q_proj"], "r": 4, "alpha": 4}])
    _randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.mmadapt["plora"]
    x = torch.randn(2, 10, 32)
    expected = x @ (layer.weight + adapter.lora_B.weight @ adapter.lora_A.weight).T
    torch.testing.assert_close(layer(x), expected)
    with modality_ids(model, _image_ids()):
        text_rows = (_image_ids() == TEXT).unsqueeze(-1)
        torch.testing.assert_close(layer(x), torch.where(text_rows, expected, x @ layer.weight.T))
