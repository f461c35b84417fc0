import pytest
import torch
from torch import nn

from mmadapt.adapters import adapters_of
from mmadapt.adapters.trp import TRP, TRPSpec
from mmadapt.hooks import StepContext
from tests.adapters.hook_loop import adapted_lm, text_logits, train
from tests.conftest import tiny_causal_lm

SIGMA = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)  # energies 9, 4, 1, .25, .04, .01 of 14.3
SPEC = {"type": "trp", "r": 4, "alpha": 8, "targets": ["q_proj", "down_proj"]}


def adapter_with_spectrum(sigma: torch.Tensor = SIGMA, **fields) -> TRP:
    """An fp64 TRP adapter (out 12, in 20, r 6) whose dW has singular values ``sigma``, in mixed-up factors."""
    generator = torch.Generator().manual_seed(0)
    adapter = TRP(nn.Linear(20, 12, dtype=torch.float64), TRPSpec(type="trp", r=6, alpha=12, **fields))
    u = torch.linalg.qr(torch.randn(12, 6, dtype=torch.float64, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64, generator=generator))[0]
    mix = torch.randn(6, 6, dtype=torch.float64, generator=generator) + 3 * torch.eye(6, dtype=torch.float64)
    with torch.no_grad():
        adapter.lora_B.weight.copy_(u * sigma @ mix)
        adapter.lora_A.weight.copy_(torch.linalg.solve(mix, v.T) / adapter.scaling)
    return adapter


def truncated_svd(weight: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def rank(weight: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(weight, rtol=1e-5))


@pytest.mark.parametrize(("energy", "k"), [(0.5, 1), (0.9, 2), (0.99, 4), (1.0, 6)])
def test_substitution_keeps_the_energy_rank_and_drops_exactly_the_tail(energy, k):
    adapter = adapter_with_spectrum(energy=energy)
    before, a_before = adapter.delta_weight().detach(), adapter.lora_A.weight.detach().clone()
    torch.testing.assert_close(torch.linalg.svdvals(before)[:6], SIGMA)
    adapter.after_step(StepContext(step=0))
    after = adapter.delta_weight().detach()
    assert rank(after) == k
    torch.testing.assert_close((before - after).square().sum(), SIGMA[k:].square().sum(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(after, truncated_svd(before, k), atol=1e-12, rtol=0)  # Eckart-Young optimum
    assert torch.equal(adapter.lora_A.weight, a_before)  # only B is projected


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_substitution_is_idempotent(energy):
    adapter = adapter_with_spectrum(energy=energy)
    adapter.after_step(StepContext(step=0))
    once = adapter.delta_weight().detach()
    adapter.after_step(StepContext(step=1))
    torch.testing.assert_close(adapter.delta_weight().detach(), once, atol=1e-12, rtol=0)


def test_substitution_runs_every_period_steps_only():
    adapter = adapter_with_spectrum(energy=0.9, period=3)
    start = adapter.delta_weight().detach()
    for step in (0, 1):
        adapter.after_step(StepContext(step=step))
        assert torch.equal(adapter.delta_weight(), start)
    adapter.after_step(StepContext(step=2))
    assert rank(adapter.delta_weight().detach()) == 2


def test_zero_delta_is_left_alone():
    adapter = TRP(nn.Linear(20, 12), TRPSpec(type="trp", r=6, energy=0.5, nuclear_weight=1.0))
    a_before = adapter.lora_A.weight.detach().clone()
    adapter.after_step(StepContext(step=0))
    assert not adapter.lora_B.weight.any() and torch.equal(adapter.lora_A.weight, a_before)
    loss = adapter.extra_loss(StepContext(step=0))
    loss.backward()
    assert loss == 0 and not adapter.lora_A.weight.grad.any() and not adapter.lora_B.weight.grad.any()


@pytest.mark.parametrize("sigma", [SIGMA, torch.linspace(4.0, 0.5, 6, dtype=torch.float64)])
@pytest.mark.parametrize("weight", [0.3, 3e-4])
def test_nuclear_subgradient_equals_autograd_of_the_nuclear_norm(sigma, weight):
    adapter = adapter_with_spectrum(sigma, nuclear_weight=weight)
    loss = adapter.extra_loss(StepContext(step=0))
    loss.backward()
    b = adapter.lora_B.weight.detach().clone().requires_grad_()
    a = adapter.lora_A.weight.detach().clone().requires_grad_()
    reference = weight * torch.linalg.matrix_norm(adapter.scaling * b @ a, "nuc")  # dW is full rank r = 6
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(adapter.lora_B.weight.grad, b.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(adapter.lora_A.weight.grad, a.grad, atol=1e-10, rtol=1e-8)


def energy_rank_by_loop(sigma: torch.Tensor, energy: float) -> int:
    total, kept = float(sigma.square().sum()), 0.0
    for k, value in enumerate(sigma.tolist(), start=1):
        kept += value**2
        if kept >= energy * total:
            return k
    return len(sigma)


def test_training_keeps_each_delta_within_its_energy_threshold():
    model = adapted_lm({**SPEC, "energy": 0.9, "nuclear_weight": 1e-3})
    truncations = []
    for name, adapter in adapters_of(model):
        adapter.after_step = recording(adapter, name, truncations)
    train(model, steps=4, lr=5e-2, weight_decay=0.1)
    assert len(truncations) == 4 * len(list(adapters_of(model)))
    kept_ranks = []
    for name, before, after in truncations:
        sigma = torch.linalg.svdvals(before.double())
        k = energy_rank_by_loop(sigma, 0.9)
        kept_ranks.append(k)
        assert rank(after) == k, name
        tail = (before - after).double().square().sum()
        torch.testing.assert_close(tail, sigma[k:].square().sum(), atol=1e-9, rtol=1e-3)
        assert tail <= 0.1 * sigma.square().sum()
    assert min(kept_ranks) < SPEC["r"]  # the threshold did cut


def recording(adapter: TRP, name: str, log: list):
    """``adapter.after_step`` that also logs dW before and after it."""
    original = adapter.after_step

    def after_step(ctx: StepContext) -> None:
        before = adapter.delta_weight().detach().clone()
        original(ctx)
        log.append((name, before, adapter.delta_weight().detach().clone()))

    return after_step


def test_text_path_is_the_base_model_after_training():
    model = adapted_lm({**SPEC, "energy": 0.9, "nuclear_weight": 1e-3})
    train(model, steps=3, lr=5e-2)
    assert torch.equal(text_logits(model), text_logits(tiny_causal_lm("llama").train()))
