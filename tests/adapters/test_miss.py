import pytest
import torch
from peft import MissConfig
from peft.tuners.miss.layer import MissLinear
from pydantic import ValidationError
from torch import nn

from mmadapt.adapters import adapter_class, adapter_parameters, inject, merge, parse_spec, unmerge
from mmadapt.adapters.miss import MiSS
from mmadapt.errors import InputError
from tests.conftest import tiny_causal_lm

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_INIT = {"balance": True, "bat": "bat", "mini": "mini"}
# (variant, r, mini_r, in, out): r = 5 does not divide in = 12, so the input is zero-padded
CASES = [("balance", 5, 1, 12, 8), ("balance", 4, 1, 12, 8), ("mini", 5, 4, 12, 8), ("bat", 4, 1, 12, 8)]


def _adapter(variant, r, mini_r, in_features, out_features, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    adapter = MiSS(layer, parse_spec({"type": "miss", "variant": variant, "r": r, "mini_r": mini_r}))
    with torch.no_grad():
        adapter.miss_block.normal_(std=0.1)
    return layer, adapter


@pytest.mark.parametrize("variant, r, mini_r, in_features, out_features", CASES)
def test_delta_weight_and_forward_equal_peft_miss_layer(variant, r, mini_r, in_features, out_features):
    layer, adapter = _adapter(variant, r, mini_r, in_features, out_features)
    config = MissConfig(r=r, mini_r=mini_r, init_weights=PEFT_INIT[variant], target_modules=["x"])
    peft_layer = MissLinear(nn.Linear(in_features, out_features), "default", config=config, r=r)
    with torch.no_grad():
        peft_layer.base_layer.load_state_dict(layer.state_dict())
        peft_layer.miss_block["default"].copy_(adapter.miss_block)
    weight = layer.weight.detach()
    if variant == "bat":
        expected = peft_layer.get_delta_weight("default", weight.clone())
    else:
        expected = peft_layer.get_delta_weight_miss("default", weight.clone()) - weight
    torch.testing.assert_close(adapter.delta_weight(), expected, atol=1e-7, rtol=0)
    x = torch.randn(6, in_features)
    torch.testing.assert_close(layer(x) + adapter(x), peft_layer(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter(x), x @ adapter.delta_weight().T, atol=1e-6, rtol=0)


def test_balance_delta_is_tiled_block():
    """dW[o, j] = D[j mod r, o]: D^T tiled along the input axis, cut to in_features."""
    _, adapter = _adapter("balance", 5, 1, 12, 8)
    block = adapter.miss_block.detach()  # (r, out)
    expected = torch.stack([block[j % 5] for j in range(12)], dim=1)  # (out, in)
    assert torch.equal(adapter.delta_weight(), expected)
    _, mini = _adapter("mini", 3, 2, 12, 8)
    assert torch.equal(mini.delta_weight()[2:4], mini.delta_weight()[:2])  # mini repeats D along out


@pytest.mark.parametrize("variant, mini_r", [("balance", 1), ("mini", 8), ("bat", 1)])
def test_zero_init_merge_and_unmerge(variant, mini_r):
    model = tiny_causal_lm()
    tokens = torch.randint(0, 97, (2, 10))
    base = model(input_ids=tokens).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = {"type": "miss", "variant": variant, "r": 4, "mini_r": mini_r, "modalities": ["text"], "targets": ALL_PROJ}
    inject(model, [spec])
    assert torch.equal(model(input_ids=tokens).logits, base)
    torch.manual_seed(1)
    for p in adapter_parameters(model).values():
        nn.init.normal_(p, std=0.05)
    adapted = model(input_ids=tokens).logits
    assert not torch.allclose(adapted, base)
    merge(model)
    torch.testing.assert_close(model(input_ids=tokens).logits, adapted, atol=1e-5, rtol=0)
    unmerge(model)
    for name, weight in weights.items():
        torch.testing.assert_close(model.get_parameter(name), weight, atol=1e-6, rtol=0)


def test_bat_unmerge_refuses_ill_conditioned_block():
    layer, adapter = _adapter("bat", 4, 1, 12, 8)
    with torch.no_grad():
        adapter.miss_block[1] = -torch.eye(4)  # I + D_1 is singular
    adapter.merge()
    merged = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="ill-conditioned"):
        adapter.unmerge()
    assert adapter.merged and torch.equal(layer.weight, merged)


def test_bad_shapes_and_specs():
    with pytest.raises(InputError, match=r"bat.*12->8.*r=3 must divide"):
        MiSS(nn.Linear(12, 8), parse_spec({"type": "miss", "variant": "bat", "r": 3}))
    with pytest.raises(InputError, match="mini_r=3 must divide out_features=8"):
        MiSS(nn.Linear(12, 8), parse_spec({"type": "miss", "variant": "mini", "r": 4, "mini_r": 3}))
    with pytest.raises(InputError, match="r=16 is larger than in_features=12"):
        MiSS(nn.Linear(12, 8), parse_spec({"type": "miss", "r": 16}))
    with pytest.raises(ValidationError, match="no dropout"):
        parse_spec({"type": "miss", "variant": "bat", "dropout": 0.1})
    with pytest.raises(ValidationError, match="variant"):
        parse_spec({"type": "miss", "variant": "tall"})


def test_bone_is_an_alias():
    assert adapter_class("bone") is MiSS
    placed = inject(tiny_causal_lm(), [{"type": "bone", "targets": ["q_proj"], "r": 4}])
    assert list(placed) == ["bone"]
