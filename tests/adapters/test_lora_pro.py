import copy

import pytest
import torch
from torch import nn

from mmadapt.adapters import adapter_parameters, adapters_of, inject, parse_spec
from mmadapt.adapters.lora_pro import LoRAPro
from mmadapt.errors import InputError
from mmadapt.hooks import StepContext, TrainingHooks
from mmadapt.optim import build_optimizer
from mmadapt.optim.lora_pro import adjusted_gradients
from tests.adapters.hook_loop import one_process_engine, step_loss, text_logits, train
from tests.conftest import tiny_causal_lm
from tests.helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {"type": "lora_pro", "r": 3, "alpha": 6, "targets": ["q_proj", "v_proj"]}
PLAIN = {"type": "lora", "r": 2, "alpha": 4, "targets": ["o_proj"]}  # not LoRA-Pro: the inner AdamW steps it
JITTER = 1e-8


def model_with_both(seed: int = 0) -> nn.Module:
    model = tiny_causal_lm(seed=seed)
    torch.manual_seed(seed + 1)
    inject(model, [SPEC, PLAIN])
    return model.train()


def dense_twin_problem(seed: int, zero_B: bool = False):
    """A fp64 LoRA-Pro layer with trained-looking A and B, its LoRA gradients and the full gradient G.

    G comes from autograd on a dense twin whose weight is the adapter's delta, fed the same rows.
    """
    torch.manual_seed(seed)
    adapter = LoRAPro(nn.Linear(10, 12, bias=False, dtype=torch.float64), parse_spec(SPEC))
    with torch.no_grad():
        adapter.lora_A.weight.normal_(std=2.0)  # well away from singular, so the 1e-8 jitter stays below atol
        adapter.lora_B.weight.copy_(torch.zeros(12, 3) if zero_B else 3 * torch.randn(12, 3))
    x = torch.randn(7, 10, dtype=torch.float64)
    target = torch.randn(7, 12, dtype=torch.float64)

    def loss(delta):
        return (delta * target).sum() + delta.sin().sum()

    loss(adapter(x)).backward()
    twin = adapter.delta_weight().detach().requires_grad_()
    loss(x @ twin.T).backward()
    A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    return A, B, adapter.lora_A.weight.grad, adapter.lora_B.weight.grad, adapter.scaling, twin.grad


def projector(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector on M's column space, with an exact inverse."""
    return M @ torch.linalg.inv(M.T @ M) @ M.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalent_gradient_is_the_projection_of_G_for_any_X(seed):
    A, B, grad_A, grad_B, s, G = dense_twin_problem(seed)
    torch.testing.assert_close(grad_A, s * B.T @ G, rtol=0, atol=1e-10)  # the twin really is the same layer
    P_B, P_A = projector(B), projector(A.T)
    expected = P_B @ G + G @ P_A - P_B @ G @ P_A
    plain_lora = s * (B @ grad_A + grad_B @ A)  # = s^2 (B B^T G + G A^T A)
    assert torch.linalg.norm(expected - G) < torch.linalg.norm(plain_lora - G)
    generator = torch.Generator().manual_seed(seed)
    free = [torch.zeros(3, 3), torch.randn(3, 3, generator=generator), 100 * torch.randn(3, 3, generator=generator)]
    for X in [None] + [x.double() for x in free]:  # None: the Sylvester solution the optimizer uses
        hat_A, hat_B = adjusted_gradients(A, B, grad_A, grad_B, s, first=False, X=X)
        assert hat_A.dtype == torch.float64
        torch.testing.assert_close(s * (B @ hat_A + hat_B @ A), expected, rtol=0, atol=1e-8)


def test_first_step_rule_projects_on_A_rows():
    """B = 0: only B can move, and the closest it gets to G is G P_A."""
    A, B, grad_A, grad_B, s, G = dense_twin_problem(0, zero_B=True)
    hat_A, hat_B = adjusted_gradients(A, B, grad_A, grad_B, s, first=True)
    assert not hat_A.any()
    torch.testing.assert_close(s * hat_B @ A, G @ projector(A.T), rtol=0, atol=1e-8)


def sylvester(left: torch.Tensor, right: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with left X + X right = rhs, by the Kronecker (vec) form."""
    r = left.shape[0]
    eye = torch.eye(r, dtype=left.dtype)
    system = torch.kron(eye, left) + torch.kron(right.T.contiguous(), eye)  # acts on column-stacked vec(X)
    return torch.linalg.solve(system, rhs.T.reshape(-1)).reshape(r, r).T


class DenseLoRAPro:
    """The algorithm written out densely in fp64: projectors, Adam on the full matrix, Sylvester X."""

    def __init__(self, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def adam(self, key: str, grad: torch.Tensor, step: int) -> torch.Tensor:
        (beta1, beta2), (m, v) = self.betas, self.moments.get(key, (0 * grad, 0 * grad))
        m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad**2
        self.moments[key] = (m, v)
        return (m / (1 - beta1 ** (step + 1))) / ((v / (1 - beta2 ** (step + 1))).sqrt() + self.eps)

    def lora_pro(self, key, A, B, grad_A, grad_B, s, step):
        r, out = A.shape[0], B.shape[0]
        aa_inv = torch.linalg.inv(A @ A.T + JITTER * torch.eye(r, dtype=A.dtype))
        if step == 0:
            full = s * (B @ grad_A + grad_B @ aa_inv @ A / s**2)
        else:
            bb_inv = torch.linalg.inv(B.T @ B + JITTER * torch.eye(r, dtype=A.dtype))
            not_B = torch.eye(out, dtype=B.dtype) - B @ bb_inv @ B.T
            full = s * (B @ bb_inv @ grad_A / s**2 + not_B @ grad_B @ aa_inv @ A / s**2)
        u = self.adam(key, full, step)
        grad_A, grad_B = s * B.T @ u, s * u @ A.T
        if step == 0:
            hat_A, hat_B = grad_A, grad_B @ aa_inv / s**2
        else:
            X = sylvester(B.T @ B, A @ A.T, -bb_inv @ grad_A @ A.T / s**2)
            hat_A = bb_inv @ grad_A / s**2 + X @ A
            hat_B = not_B @ grad_B @ aa_inv / s**2 - B @ X
        return self.sgd(A, hat_A), self.sgd(B, hat_B)

    def adamw(self, key, param, grad, step):
        return self.sgd(param, self.adam(key, grad, step))

    def sgd(self, param, grad):
        return param * (1 - self.lr * self.weight_decay) - self.lr * grad


def test_optimizer_step_matches_dense_recomputation():
    model = model_with_both()
    params = adapter_parameters(model)
    groups = [{"params": list(params.values()), "lr": 0.05, "weight_decay": 0.1}]
    optimizer = build_optimizer("lora_pro", groups, model, {}, zero_stage=0)
    reference = DenseLoRAPro(lr=0.05, weight_decay=0.1)
    for step in range(3):  # the first-step rule, then two full ones
        step_loss(model, StepContext(step)).backward()
        before = {n: (p.detach().double().clone(), p.grad.double().clone()) for n, p in params.items()}
        optimizer.step()
        optimizer.zero_grad()
        for name, adapter in adapters_of(model):
            (A, grad_A), (B, grad_B) = before[f"{name}.lora_A.weight"], before[f"{name}.lora_B.weight"]
            if isinstance(adapter, LoRAPro):
                expected = reference.lora_pro(name, A, B, grad_A, grad_B, adapter.scaling, step)
            else:
                new_A = reference.adamw(f"{name}.A", A, grad_A, step)
                expected = (new_A, reference.adamw(f"{name}.B", B, grad_B, step))
            for param, value in zip((adapter.lora_A.weight, adapter.lora_B.weight), expected):
                torch.testing.assert_close(param.double(), value, rtol=1e-4, atol=1e-6, msg=f"{name} step {step}")
    assert all(a.lora_A.weight.grad is None for _, a in adapters_of(model))  # zero_grad reached every factor


def test_each_step_descends_and_the_text_path_stays_untouched():
    model = model_with_both()
    after = []

    def loss_after_update(ctx):
        with torch.no_grad():
            after.append(step_loss(model, ctx).item())

    before = train(model, steps=4, lr=1e-2, optimizer_name="lora_pro", on_step=loss_after_update)
    assert all(a < b for a, b in zip(after, before)), (before, after)  # each step's own batch
    assert all(a.lora_B.weight.abs().sum() > 0 for _, a in adapters_of(model))
    assert torch.equal(text_logits(model), text_logits(tiny_causal_lm().train()))


def test_resume_from_saved_state_is_exact():
    straight = model_with_both()
    straight_losses = train(straight, steps=4, optimizer_name="lora_pro", weight_decay=0.1)

    first_half, saved = model_with_both(), {}

    def save(ctx):
        saved["optimizer"] = copy.deepcopy(ctx.optimizer.state_dict())

    train(first_half, steps=3, optimizer_name="lora_pro", weight_decay=0.1, on_step=save)
    full_space = [s for s in saved["optimizer"]["state"].values() if "full_exp_avg" in s]
    assert len(full_space) == len([a for _, a in adapters_of(first_half) if isinstance(a, LoRAPro)])
    resumed = model_with_both(seed=5)  # different weights everywhere until the state is loaded
    resumed.load_state_dict(first_half.state_dict())
    resumed_losses = train(
        resumed, steps=4, optimizer_name="lora_pro", weight_decay=0.1, first_step=3, optimizer_state=saved["optimizer"]
    )
    assert resumed_losses == straight_losses[3:]
    for name, param in adapter_parameters(straight).items():
        assert torch.equal(param, adapter_parameters(resumed)[name]), name


@pytest.mark.parametrize("bf16", [False, True])
def test_pairs_survive_deepspeeds_zero0_wrapping(bf16):
    """ZeRO 0 with bf16 hands the optimizer fp32 copies of the parameters: pairing by position still finds them.
    In fp32 the engine's steps are the bare optimizer's, bit for bit."""
    pytest.importorskip("deepspeed")
    bare, wrapped = model_with_both(), model_with_both()
    engine = one_process_engine(wrapped, "lora_pro", stage=0, bf16=bf16)
    groups = [{"params": list(adapter_parameters(bare).values()), "lr": 1e-2, "weight_decay": 0.0}]
    optimizer = build_optimizer("lora_pro", groups, bare, {}, zero_stage=0)
    for step in range(2):
        engine.backward(step_loss(engine.module, StepContext(step)))
        engine.step()
        step_loss(bare, StepContext(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    inner = engine.optimizer.optimizer if bf16 else engine.optimizer  # bf16: DeepSpeed's wrapper around ours
    assert isinstance(inner, type(optimizer))
    assert sum("full_exp_avg" in state for state in inner.state.values()) == len(inner.pairs) == 4
    if not bf16:
        for name, param in adapter_parameters(bare).items():
            assert torch.equal(param, adapter_parameters(engine.module)[name]), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_above_0_are_refused_with_the_stage_named(stage):
    model = model_with_both()
    groups = [{"params": list(adapter_parameters(model).values()), "lr": 1e-3, "weight_decay": 0.0}]
    refused = rf"train\.optimizer=lora_pro supports deepspeed\.zero_stage 0 only .*got {stage}"
    with pytest.raises(InputError, match=refused):
        build_optimizer("lora_pro", groups, model, {}, zero_stage=stage)
    with pytest.raises(InputError, match=rf"deepspeed\.zero_stage={stage}: adapter lora_pro .*0 only: its optimizer"):
        TrainingHooks(model).check_zero_stage(stage)


def test_a_factor_trained_without_its_partner_is_refused():
    model = model_with_both()
    only_A = [p for n, p in adapter_parameters(model).items() if ".lora_pro." in n and "lora_A" in n]
    with pytest.raises(InputError, match=r"lora_pro adapter .*q_proj.*: A and B must train together"):
        build_optimizer("lora_pro", [{"params": only_A, "lr": 1e-3, "weight_decay": 0.0}], model, {}, zero_stage=0)


def test_unknown_optimizer_args_are_refused_by_key():
    model = model_with_both()
    groups = [{"params": list(adapter_parameters(model).values()), "lr": 1e-3, "weight_decay": 0.0}]
    with pytest.raises(InputError, match=r"train\.optimizer_args: lora_pro takes betas, eps, not rank"):
        build_optimizer("lora_pro", groups, model, {"rank": 4}, zero_stage=0)
