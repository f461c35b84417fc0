import torch

from mmadapt.adapters import adapters_of
from tests.adapters.hook_loop import adapted_lm, text_logits, train
from tests.conftest import tiny_causal_lm

SPEC = {"type": "lora_sp", "r": 4, "alpha": 8, "targets": ["q_proj", "down_proj"]}


def test_masks_keep_exactly_the_fraction():
    model = adapted_lm({**SPEC, "keep": 0.3})
    for _, adapter in adapters_of(model):
        for mask in (adapter.mask_A, adapter.mask_B):
            assert int(mask.sum()) == int(0.3 * mask.numel())
            assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_frozen_entries_never_move_under_adamw_with_weight_decay():
    model = adapted_lm(SPEC)
    before = {name: (a.lora_A.weight.detach().clone(), a.lora_B.weight.detach().clone()) for name, a in adapters_of(model)}
    losses = train(model, steps=6, lr=5e-2, weight_decay=0.1, grad_accum=2)
    assert losses[-1] < losses[0]
    for name, adapter in adapters_of(model):
        a0, b0 = before[name]
        a, b = adapter.lora_A.weight, adapter.lora_B.weight
        frozen_a, frozen_b = adapter.mask_A == 0, adapter.mask_B == 0
        assert torch.equal(a[frozen_a], a0[frozen_a]) and torch.equal(b[frozen_b], b0[frozen_b]), name
        assert not torch.equal(a[~frozen_a], a0[~frozen_a]) and b[~frozen_b].abs().sum() > 0, name


def test_text_path_is_the_base_model_after_training():
    model = adapted_lm(SPEC)
    train(model, steps=3, lr=5e-2)
    assert torch.equal(text_logits(model), text_logits(tiny_causal_lm("llama").train()))
