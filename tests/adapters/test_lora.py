import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from mmadapt.adapters import adapter_class, adapter_parameters, inject, merge, modality_ids, parse_spec, unmerge
from mmadapt.adapters.lora import LoRA
from mmadapt.adapters.plora import PLoRA
from mmadapt.modality import IMAGE, TEXT
from tests.conftest import tiny_causal_lm

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(spec: dict, out_features=12, in_features=10, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, dtype=dtype)
    adapter = LoRA(layer, parse_spec({"type": "lora", **spec}))
    nn.init.normal_(adapter.lora_B.weight)
    return layer, adapter


def test_grads_equal_projected_dense_gradient():
    """dL/dA = s * B^T G and dL/dB = s * G A^T, with G = dL/dW from a dense twin."""
    layer, adapter = _adapter({"r": 3, "alpha": 5.0}, dtype=torch.float64)
    x = torch.randn(7, 10, dtype=torch.float64)
    target = torch.randn(7, 12, dtype=torch.float64)
    ((layer(x) + adapter(x) - target) ** 2).sum().backward()
    s = 5.0 / 3
    dense = (layer.weight + adapter.delta_weight()).detach().requires_grad_(True)
    ((x @ dense.T + layer.bias - target) ** 2).sum().backward()
    grad = dense.grad  # G: (out, in)
    a, b = adapter.lora_A.weight, adapter.lora_B.weight
    torch.testing.assert_close(a.grad, s * b.detach().T @ grad)
    torch.testing.assert_close(b.grad, s * grad @ a.detach().T)


def test_delta_weight_matches_forward_and_rslora_scale():
    for use_rslora, scale in ((False, 8.0 / 4), (True, 8.0 / math.sqrt(4))):
        _, adapter = _adapter({"r": 4, "alpha": 8.0, "use_rslora": use_rslora})
        assert adapter.scaling == scale
        x = torch.randn(5, 10)
        expected = scale * adapter.lora_B.weight @ adapter.lora_A.weight
        torch.testing.assert_close(adapter.delta_weight(), expected)
        torch.testing.assert_close(adapter(x), x @ expected.T)


def test_dropout_only_in_training():
    _, adapter = _adapter({"r": 2, "dropout": 0.5})
    x = torch.randn(64, 10)
    adapter.eval()
    torch.testing.assert_close(adapter(x), x @ adapter.delta_weight().T)
    adapter.train()
    torch.manual_seed(5)
    got = adapter(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got, dropped @ adapter.delta_weight().T)


def test_zero_init_equals_base_and_merge_roundtrip():
    model = tiny_causal_lm()
    tokens = torch.randint(0, 97, (2, 10))
    base = model(input_ids=tokens).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, [{"type": "lora", "modalities": ["text"], "targets": ALL_PROJ, "r": 4, "alpha": 8}])
    assert torch.equal(model(input_ids=tokens).logits, base)
    torch.manual_seed(1)
    for p in adapter_parameters(model).values():
        nn.init.normal_(p, std=0.2)
    adapted = model(input_ids=tokens).logits
    assert not torch.allclose(adapted, base)
    assert len(merge(model)) == 2 * 7
    torch.testing.assert_close(model(input_ids=tokens).logits, adapted, atol=1e-5, rtol=0)
    unmerge(model)
    for name, weight in weights.items():
        torch.testing.assert_close(model.get_parameter(name), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=tokens).logits, adapted, atol=1e-6, rtol=0)


def test_modality_rows_only():
    model = tiny_causal_lm()
    inject(model, [{"type": "lora", "modalities": ["image"], "targets": ["q_proj"], "r": 2}])
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.mmadapt["lora"]
    nn.init.normal_(adapter.lora_B.weight)
    ids = torch.full((2, 6), TEXT)
    ids[:, 1:3] = IMAGE
    x = torch.randn(2, 6, 32)
    with modality_ids(model, ids):
        got = layer(x)
    expected = x @ layer.weight.T + (ids == IMAGE).unsqueeze(-1) * adapter(x.reshape(-1, 32)).view(2, 6, 32)
    torch.testing.assert_close(got, expected)


def test_plora_is_lora_under_its_own_name():
    assert issubclass(adapter_class("plora"), LoRA) and adapter_class("plora") is PLoRA
    assert adapter_class("lora") is LoRA
    model = tiny_causal_lm()
    inject(model, [{"type": "plora", "targets": ["q_proj"], "r": 2, "use_rslora": True}])
    assert {n.split("mmadapt.plora.")[1] for n in adapter_parameters(model)} == {"lora_A.weight", "lora_B.weight"}


def test_bad_spec_errors():
    with pytest.raises(ValidationError, match="r"):
        parse_spec({"type": "lora", "r": 0})
    with pytest.raises(ValidationError, match="rslora"):
        parse_spec({"type": "lora", "rslora": True})
