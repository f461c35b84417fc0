import pytest
import torch
from pydantic import ValidationError

from mmadapt.adapters import adapter_parameters, adapters_of, parse_spec
from mmadapt.hooks import StepContext, TrainingHooks, gradient_hooks
from tests.adapters.hook_loop import adapted_lm, step_loss, text_logits, train
from tests.conftest import tiny_causal_lm

SPEC = {"type": "allora", "r": 4, "eta": 3.0, "targets": ["q_proj", "down_proj"]}


def grads(model: torch.nn.Module, hooked: bool) -> dict[str, torch.Tensor]:
    """Adapter gradients of one batch's loss, with or without the method's gradient hooks."""
    model.zero_grad()
    loss = step_loss(model, StepContext(step=0))
    if hooked:
        with gradient_hooks(TrainingHooks(model)):
            loss.backward()
    else:
        loss.backward()
    return {name: param.grad.clone() for name, param in adapter_parameters(model).items()}


def test_zero_B_rows_get_exactly_eta():
    model = adapted_lm(SPEC)
    plain, hooked = grads(model, hooked=False), grads(model, hooked=True)
    b_grads = [name for name in plain if name.endswith("lora_B.weight")]
    assert b_grads and all(plain[name].any() for name in b_grads)
    for name in b_grads:
        assert torch.equal(hooked[name], plain[name] * SPEC["eta"]), name


def test_rows_far_from_zero_get_one_over_their_norm():
    model = adapted_lm({**SPEC, "eta": 1.0})
    torch.manual_seed(3)
    params = adapter_parameters(model)
    with torch.no_grad():
        for param in params.values():  # rows of norm 1e3 to 1e4, far above 1 / eta
            norms = torch.empty(len(param), 1).uniform_(1e3, 1e4)  # (rows, 1)
            param.copy_(torch.nn.functional.normalize(torch.randn_like(param), dim=1) * norms)
    plain, hooked = grads(model, hooked=False), grads(model, hooked=True)
    for name, param in params.items():
        expected = plain[name] / param.detach().norm(dim=1, keepdim=True)
        torch.testing.assert_close(hooked[name], expected, rtol=1e-3, atol=0)


def test_forward_and_merge_are_lora_with_unit_scale():
    lora_spec = {**{k: v for k, v in SPEC.items() if k != "eta"}, "type": "lora", "alpha": SPEC["r"]}
    pairs = zip(adapters_of(adapted_lm(SPEC)), adapters_of(adapted_lm(lora_spec)))
    torch.manual_seed(0)
    for (name, allora), (_, lora) in pairs:
        with torch.no_grad():
            allora.lora_B.weight.normal_()
        lora.load_state_dict(allora.state_dict())
        x = torch.randn(5, allora.lora_A.weight.shape[1])  # (N, in)
        assert torch.equal(allora(x), lora(x)), name
        assert torch.equal(allora.delta_weight(), lora.delta_weight()), name
        assert torch.equal(allora.delta_weight(), allora.lora_B.weight @ allora.lora_A.weight), name


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"alpha": 16}, r"alpha\n.*allora has no scale \(delta = B A\): leave alpha out or set it to r"),
        ({"dropout": 0.1}, r"dropout\n.*allora has no dropout: leave it out"),
        ({"use_rslora": True}, r"use_rslora\n.*allora has no use_rslora: leave it out"),
    ],
)
def test_scale_and_dropout_are_refused(entry, message):
    with pytest.raises(ValidationError, match=message):
        parse_spec({**SPEC, **entry})


def test_alpha_is_r_whether_left_out_or_given():
    assert parse_spec(SPEC).alpha == parse_spec({**SPEC, "alpha": 4}).alpha == 4


def test_text_path_is_the_base_model_after_training():
    model = adapted_lm(SPEC)
    train(model, steps=3, lr=5e-2, grad_accum=2)
    assert all(a.lora_B.weight.any() for _, a in adapters_of(model))
    assert torch.equal(text_logits(model), text_logits(tiny_causal_lm("llama").train()))
