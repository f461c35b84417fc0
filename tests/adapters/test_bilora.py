import pytest
import torch

from mmadapt.adapters import adapters_of, modality_ids
from mmadapt.hooks import TrainingHooks, gradient_hooks
from mmadapt.trainer import split_indices
from tests.adapters.hook_loop import adapted_lm, batch, step_loss, text_logits, train
from tests.conftest import tiny_causal_lm

SPEC = {"type": "bilora", "r": 4, "alpha": 8, "targets": ["q_proj", "down_proj"]}


def factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return {name: tuple(p.detach().clone() for p in (a.P, a.Q, a.lam)) for name, a in adapters_of(model)}


def test_starts_at_the_base_model_with_small_factors_and_zero_lam():
    model = adapted_lm(SPEC)
    for _, adapter in adapters_of(model):
        assert adapter.lam.shape == (4,) and not adapter.lam.any()
        assert adapter.P.any() and adapter.Q.any() and adapter.P.abs().max() < 0.2
    tokens, modality, _ = batch(0)
    with torch.no_grad(), modality_ids(model, modality):
        adapted = model(tokens).logits
    assert torch.equal(adapted, tiny_causal_lm("llama").train()(tokens).logits)


def test_orthogonality_regulariser_is_zero_exactly_for_orthonormal_factors():
    model = adapted_lm({**SPEC, "orth_weight": 0.5})
    name, adapter = next(iter(adapters_of(model)))
    ctx = TrainingHooks(model).context(0)
    assert ctx.split == "lower"
    p, q = adapter.P.detach(), adapter.Q.detach()
    eye = torch.eye(4)
    expected = 0.5 * ((p.T @ p - eye).square().sum() + (q @ q.T - eye).square().sum())
    torch.testing.assert_close(adapter.extra_loss(ctx), expected)
    with torch.no_grad():
        adapter.P.copy_(torch.linalg.qr(torch.randn_like(p))[0])  # orthonormal columns
        adapter.Q.copy_(torch.linalg.qr(torch.randn_like(q).T)[0].T)  # orthonormal rows
    assert adapter.orthogonality() < 1e-10, name
    assert adapter.extra_loss(TrainingHooks(model).context(1)) is None  # upper steps: no regulariser


def test_split_schedule_and_fractions_follow_the_config():
    adapter = next(a for _, a in adapters_of(adapted_lm({**SPEC, "inner_steps": 2, "upper_fraction": 0.25})))
    assert [adapter.split_for_step(s) for s in range(6)] == ["lower", "lower", "upper"] * 2
    assert adapter.data_splits() == {"lower": 0.75, "upper": 0.25}


@pytest.mark.parametrize("n", [30, 31, 100])
def test_trainer_draws_disjoint_splits_sized_by_the_fractions(n):
    adapter = next(a for _, a in adapters_of(adapted_lm(SPEC)))
    splits = split_indices(n, adapter.data_splits(), seed=3)
    lower, upper = set(splits["lower"]), set(splits["upper"])
    assert not lower & upper and lower | upper == set(range(n))
    assert len(splits["upper"]) == len(upper) == round(n / 3)


def test_gradient_hooks_pass_only_the_steps_level():
    model = adapted_lm(SPEC)
    hooks = TrainingHooks(model)
    train(model, steps=2, lr=5e-2)  # lam leaves zero, so every factor gets a data gradient
    with gradient_hooks(hooks):
        for step, trained in ((2, "PQ"), (3, "lam")):
            model.zero_grad()
            step_loss(model, hooks.context(step)).backward()
            for name, adapter in adapters_of(model):
                grads = {"P": adapter.P.grad, "Q": adapter.Q.grad, "lam": adapter.lam.grad}
                for param_name, grad in grads.items():
                    assert bool(grad.any()) == (param_name in trained), (name, step, param_name)


def test_gradient_hook_without_a_split_refuses():
    model = adapted_lm(SPEC)
    with gradient_hooks(TrainingHooks(model)):
        tokens, modality, _ = batch(0)
        with modality_ids(model, modality):
            loss = model(tokens).logits.sum()
        with pytest.raises(RuntimeError, match="bilora: a gradient arrived before extra_loss"):
            loss.backward()


def test_lower_steps_move_only_p_q_and_upper_steps_only_lam_under_adamw():
    model = adapted_lm(SPEC)
    history = [factors(model)]
    splits = []
    losses = train(
        model, steps=7, lr=5e-2, weight_decay=0.1, grad_accum=2,
        on_step=lambda ctx: (history.append(factors(model)), splits.append(ctx.split)),
    )
    assert splits == ["lower", "upper"] * 3 + ["lower"]
    assert losses[-1] < losses[0]
    for step, split in enumerate(splits):
        for name in history[0]:
            (p0, q0, lam0), (p1, q1, lam1) = history[step][name], history[step + 1][name]
            moved = {"P": not torch.equal(p0, p1), "Q": not torch.equal(q0, q1), "lam": not torch.equal(lam0, lam1)}
            lower = split == "lower"
            assert moved == {"P": lower, "Q": lower, "lam": not lower}, (step, split, name)


def test_text_path_is_the_base_model_after_training():
    model = adapted_lm(SPEC)
    train(model, steps=4, lr=5e-2, weight_decay=0.1)
    assert torch.equal(text_logits(model), text_logits(tiny_causal_lm("llama").train()))
