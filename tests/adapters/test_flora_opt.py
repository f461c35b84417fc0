import copy

import pytest
import torch
from torch import nn

from mmadapt.adapters import adapters_of, merge, modality_ids, parse_spec
from mmadapt.adapters.flora_opt import FloraOpt
from mmadapt.hooks import StepContext
from tests.adapters.hook_loop import adapted_lm, batch, one_process_engine, step_loss, text_logits, train
from tests.helpers import one_thread  # noqa: F401  (fixture)
from tests.conftest import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {"type": "flora_opt", "r": 3, "targets": ["q_proj", "down_proj"]}


def image_logits(model: nn.Module) -> torch.Tensor:
    tokens, modality, _ = batch(998)
    with torch.no_grad(), modality_ids(model, modality):
        return model(tokens).logits


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, a in adapters_of(model) for k, v in a.state_dict().items()}


def test_grad_of_B_is_G_times_A_transposed():
    """Against autograd on a dense twin holding the adapter's whole delta (fp64)."""
    torch.manual_seed(0)
    adapter = FloraOpt(nn.Linear(10, 12, bias=False, dtype=torch.float64), parse_spec(SPEC))
    with torch.no_grad():
        adapter.lora_B.normal_()
        adapter.delta_acc.normal_()  # as after a resample: the forward must carry it too
    x, target = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)

    def loss(delta):
        return (delta * target).sum() + delta.sin().sum()

    loss(adapter(x)).backward()
    twin = adapter.delta_weight().detach().requires_grad_()
    loss(x @ twin.T).backward()
    torch.testing.assert_close(adapter.lora_B.grad, twin.grad @ adapter.lora_A.T, rtol=0, atol=1e-12)
    assert [name for name, _ in adapter.named_parameters()] == ["lora_B"]  # A and delta_acc are frozen buffers


def test_A_entries_have_variance_one_over_r():
    torch.manual_seed(0)
    adapter = FloraOpt(nn.Linear(8192, 4), parse_spec({**SPEC, "r": 4}))
    assert adapter.lora_A.shape == (4, 8192)
    assert abs(adapter.lora_A.var().item() * 4 - 1) < 0.05


def trained(spec: dict, steps: int, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, kept = adapted_lm(spec), {}
    train(model, steps=steps, lr=2e-2, on_step=lambda ctx: kept.update(optimizer=ctx.optimizer), **kwargs)
    return model, kept["optimizer"]


@pytest.mark.parametrize("second_moment", ["row_mean", "zero"])
def test_resample_keeps_the_output_and_moves_the_moments(second_moment):
    model, optimizer = trained({**SPEC, "kappa": 100, "second_moment": second_moment}, steps=2)
    before = {n: (a.lora_A.clone(), a.lora_B.detach().clone(), a.delta_acc.clone()) for n, a in adapters_of(model)}
    moments = {name: {k: v.clone() for k, v in optimizer.state[a.lora_B].items()} for name, a in adapters_of(model)}
    logits = image_logits(model)

    ctx = StepContext(step=2, seed=7, optimizer=optimizer)
    for _, adapter in adapters_of(model):
        adapter.end_stage(ctx)

    torch.testing.assert_close(image_logits(model), logits, rtol=0, atol=1e-5)
    for name, adapter in adapters_of(model):
        old_A, old_B, old_acc = before[name]
        new_A, state = adapter.lora_A, optimizer.state[adapter.lora_B]
        assert old_B.abs().sum() > 0 and not adapter.lora_B.any()
        assert not torch.allclose(new_A, old_A)
        torch.testing.assert_close(adapter.delta_acc, old_acc + old_B @ old_A)
        torch.testing.assert_close(state["exp_avg"], moments[name]["exp_avg"] @ old_A @ new_A.T)
        old_second = moments[name]["exp_avg_sq"]
        row_means = old_second.mean(dim=1, keepdim=True).expand_as(old_second)
        torch.testing.assert_close(state["exp_avg_sq"], row_means if second_moment == "row_mean" else 0 * old_second)
        assert torch.equal(state["step"], moments[name]["step"])


def test_zero2_moves_the_moments_inside_deepspeeds_partitions():
    """Under ZeRO 1-2 the fp32 master of B and its moments live in DeepSpeed's flat partitions."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = one_process_engine(adapted_lm({**SPEC, "kappa": 100}), "adamw", stage=2)
    for step in range(2):
        engine.backward(step_loss(engine.module, StepContext(step)))
        engine.step()
    adapters = [a for _, a in adapters_of(engine.module)]

    def snapshot(adapter):
        moments = (safe_get_full_optimizer_state(adapter.lora_B, key).clone() for key in ("exp_avg", "exp_avg_sq"))
        return adapter.lora_A.clone(), safe_get_full_fp32_param(adapter.lora_B).clone(), *moments

    before = [snapshot(a) for a in adapters]
    for adapter in adapters:
        adapter.end_stage(StepContext(step=1, optimizer=engine.optimizer))
    for adapter, (old_A, old_B, first, second) in zip(adapters, before):
        assert old_B.abs().sum() > 0 and not safe_get_full_fp32_param(adapter.lora_B).any()
        torch.testing.assert_close(adapter.delta_acc, old_B @ old_A)
        moved = safe_get_full_optimizer_state(adapter.lora_B, "exp_avg")
        torch.testing.assert_close(moved, first @ old_A @ adapter.lora_A.T)
        row_means = second.mean(dim=1, keepdim=True).expand_as(second)
        torch.testing.assert_close(safe_get_full_optimizer_state(adapter.lora_B, "exp_avg_sq"), row_means)


def test_draws_repeat_on_every_rank_and_differ_between_layers():
    first, second = adapted_lm(SPEC), adapted_lm(SPEC)  # two ranks: the same construction seed
    for ctx in (None, StepContext(step=4, seed=3)):
        if ctx is not None:
            for model in (first, second):
                for _, adapter in adapters_of(model):
                    adapter.end_stage(ctx)
        draws = [a.lora_A for _, a in adapters_of(first)]
        assert all(torch.equal(a, b.lora_A) for a, (_, b) in zip(draws, adapters_of(second)))
        assert not torch.equal(draws[0][:, :8], draws[1][:, :8])
    other_step = adapted_lm(SPEC)
    for _, adapter in adapters_of(other_step):
        adapter.end_stage(StepContext(step=5, seed=3))
    assert not torch.equal(next(adapters_of(other_step))[1].lora_A, next(adapters_of(first))[1].lora_A)


def test_resume_from_saved_state_is_exact():
    spec = {**SPEC, "kappa": 2}
    straight = adapted_lm(spec)
    straight_losses = train(straight, steps=4, lr=2e-2, weight_decay=0.1)  # resamples after steps 2 and 4

    first_half, saved = adapted_lm(spec), {}

    def save(ctx):
        saved["optimizer"] = copy.deepcopy(ctx.optimizer.state_dict())

    train(first_half, steps=3, lr=2e-2, weight_decay=0.1, on_step=save)
    resumed = adapted_lm(spec, seed=5)  # other weights, A draws and seeds until the state is loaded
    resumed.load_state_dict(first_half.state_dict())
    resumed_losses = train(
        resumed, steps=4, lr=2e-2, weight_decay=0.1, first_step=3, optimizer_state=saved["optimizer"]
    )
    assert resumed_losses == straight_losses[3:]
    expected = adapter_state(straight)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(resumed).items())


def test_text_path_is_the_base_model_after_resamples():
    model, _ = trained({**SPEC, "kappa": 2}, steps=4)
    assert all(a.delta_acc.abs().sum() > 0 for _, a in adapters_of(model))  # two resamples happened
    assert torch.equal(text_logits(model), text_logits(tiny_causal_lm().train()))
    with torch.no_grad():
        base = tiny_causal_lm().train()(batch(998)[0]).logits
    assert not torch.allclose(image_logits(model), base)


def test_merge_folds_in_the_accumulated_delta():
    model, _ = trained({**SPEC, "kappa": 2, "modalities": ["text", "image"]}, steps=3)
    assert all(a.delta_acc.abs().sum() > 0 and a.lora_B.abs().sum() > 0 for _, a in adapters_of(model))
    expected = image_logits(model)
    merge(model)
    torch.testing.assert_close(image_logits(model), expected, rtol=0, atol=1e-5)


def test_alpha_is_refused():
    with pytest.raises(ValueError, match="flora_opt has no alpha / r scale"):
        parse_spec({**SPEC, "alpha": 8})
