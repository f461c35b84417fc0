import pytest
import torch
from torch import nn

from mmadapt.adapters import adapter_parameters, adapters_of, inject, merge, modality_ids, parse_spec, unmerge
from mmadapt.adapters.melora import MELoRA
from mmadapt.errors import InputError
from mmadapt.modality import IMAGE, TEXT
from tests.conftest import tiny_causal_lm

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(out_features=24, in_features=16, n=4, r=2, alpha=6.0, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    adapter = MELoRA(layer, parse_spec({"type": "melora", "n": n, "r": r, "alpha": alpha}))
    nn.init.normal_(adapter.lora_B)
    return adapter


def test_einsum_path_equals_per_chunk_loop():
    adapter = _adapter()
    x = torch.randn(5, 16)
    expected = torch.cat(
        [x_k @ a_k.T @ b_k.T for x_k, a_k, b_k in zip(x.chunk(4, dim=1), adapter.lora_A, adapter.lora_B)], dim=1
    ) * (6.0 / 2)
    torch.testing.assert_close(adapter(x), expected)


def test_delta_weight_is_block_diagonal_and_matches_forward():
    adapter = _adapter()
    delta = adapter.delta_weight()  # (24, 16): 4 blocks of (6, 4)
    blocks = delta.reshape(4, 6, 4, 4).permute(0, 2, 1, 3)  # (out block, in block, 6, 4)
    for k in range(4):
        for j in range(4):
            if k != j:
                assert torch.equal(blocks[k, j], torch.zeros(6, 4))
        torch.testing.assert_close(blocks[k, k], adapter.lora_B[k] @ adapter.lora_A[k] * 3.0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(adapter(x), x @ delta.T)


def test_rank_is_at_most_n_times_r():
    adapter = _adapter(out_features=32, in_features=32, n=4, r=1)
    assert torch.linalg.matrix_rank(adapter.delta_weight()) == 4  # one LoRA of rank 1 would give 1


def test_zero_init_equals_base():
    model = tiny_causal_lm()
    tokens = torch.randint(0, 97, (2, 10))
    base = model(input_ids=tokens).logits
    inject(model, [{"type": "melora", "modalities": ["image"], "targets": ALL_PROJ, "r": 2, "n": 2}])
    ids = torch.full((2, 10), TEXT)
    ids[:, 3:7] = IMAGE
    with modality_ids(model, ids):
        assert torch.equal(model(input_ids=tokens).logits, base)
    assert {n.rsplit(".", 1)[-1] for n in adapter_parameters(model)} == {"lora_A", "lora_B"}


def test_merge_and_unmerge_on_text_modality():
    model = tiny_causal_lm()
    tokens = torch.randint(0, 97, (2, 10))
    base = model(input_ids=tokens).logits
    inject(model, [{"type": "melora", "modalities": ["text"], "targets": ALL_PROJ, "r": 2, "n": 4}])
    torch.manual_seed(1)
    for p in adapter_parameters(model).values():
        nn.init.normal_(p, std=0.2)
    weights = {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unmerged = model(input_ids=tokens).logits
    assert not torch.allclose(unmerged, base, atol=1e-3)
    assert len(merge(model)) == 2 * 7
    assert all(adapter.merged for _, adapter in adapters_of(model))
    torch.testing.assert_close(model(input_ids=tokens).logits, unmerged, atol=1e-5, rtol=0)
    unmerge(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(module.weight, weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [3, 5])
def test_n_must_divide_the_layer_shape(n):
    # q_proj is 32 -> 32, k_proj 32 -> 16: neither 3 nor 5 divides them.
    with pytest.raises(InputError, match=rf"melora: n={n} .*\(out=\d+, in=32\)"):
        inject(tiny_causal_lm(), [{"type": "melora", "targets": ["q_proj"], "n": n}])


def test_divides_in_but_not_out():
    layer = nn.Linear(16, 12)
    with pytest.raises(InputError, match=r"\(out=12, in=16\)"):
        MELoRA(layer, parse_spec({"type": "melora", "n": 8}))


def test_unknown_spec_field_is_rejected():
    with pytest.raises(ValueError, match="blocks"):
        parse_spec({"type": "melora", "blocks": 4})
