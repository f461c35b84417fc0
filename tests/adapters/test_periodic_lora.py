import pytest
import torch

from mmadapt.adapters import adapters_of, merge, modality_ids, unmerge
from mmadapt.hooks import StepContext, TrainingHooks
from tests.adapters.hook_loop import adapted_lm, batch, text_logits, train
from tests.conftest import tiny_causal_lm

SPEC = {"type": "periodic_lora", "r": 2, "alpha": 4, "targets": ["q_proj", "down_proj"], "stage_steps": 3}


def image_logits(model: torch.nn.Module) -> torch.Tensor:
    tokens, modality, _ = batch(998)
    with torch.no_grad(), modality_ids(model, modality):
        return model(tokens).logits


def trained_to_stage_end(spec: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model trained up to (not through) the end of its first stage, and its optimizer."""
    seen = {}
    model = adapted_lm(spec)
    train(model, steps=spec["stage_steps"] - 1, lr=5e-2, on_step=lambda ctx: seen.update(optimizer=ctx.optimizer))
    return model, seen["optimizer"]


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_unload_keeps_the_function_and_clears_optimizer_state(beta):
    model, optimizer = trained_to_stage_end({**SPEC, "beta": beta})
    adapters = dict(adapters_of(model))
    before = {n: (a.lora_A.weight.detach().clone(), a.lora_B.weight.detach().clone()) for n, a in adapters.items()}
    assert all(a.lora_A.weight in optimizer.state and a.lora_B.weight in optimizer.state for a in adapters.values())
    logits = image_logits(model)

    last_step = StepContext(step=SPEC["stage_steps"] - 1, optimizer=optimizer)
    TrainingHooks(model).after_step(last_step)  # the trainer's call: the stage ends here

    torch.testing.assert_close(image_logits(model), logits, atol=1e-6, rtol=0)
    for name, adapter in adapters.items():
        a0, b0 = before[name]
        assert adapter.lora_A.weight not in optimizer.state and adapter.lora_B.weight not in optimizer.state
        torch.testing.assert_close(adapter.delta_acc, (1 - beta) * adapter.scaling * b0 @ a0, atol=1e-7, rtol=0)
        assert torch.equal(adapter.lora_B.weight, beta * b0)
        assert torch.equal(adapter.lora_A.weight, a0) == (beta > 0), name  # redrawn only when B is reset to zero


def test_stages_accumulate_an_update_of_rank_above_r():
    model = adapted_lm({**SPEC, "stage_steps": 2})
    train(model, steps=8, lr=5e-2)
    for name, adapter in adapters_of(model):
        assert torch.linalg.matrix_rank(adapter.delta_acc) == 4 * SPEC["r"], name  # one rank-r unload per stage
        assert torch.linalg.matrix_rank(adapter.delta_weight()) > SPEC["r"], name


def test_redrawn_A_depends_only_on_saved_state_and_step():
    """What every rank and a resumed run repeat: the same A, different in each layer."""
    model, optimizer = trained_to_stage_end(SPEC)
    state = model.state_dict()
    twin = adapted_lm(SPEC, seed=5)  # built from other draws, then given the saved state
    seeds = [(a.reinit_seed, b.reinit_seed) for (_, a), (_, b) in zip(adapters_of(model), adapters_of(twin))]
    assert not any(torch.equal(mine, its) for mine, its in seeds)
    twin.load_state_dict(state)
    ctx = StepContext(step=SPEC["stage_steps"] - 1, seed=7)
    for m in (model, twin):
        for _, adapter in adapters_of(m):
            adapter.end_stage(ctx)
    redrawn = {name: adapter.lora_A.weight for name, adapter in adapters_of(model)}
    assert all(torch.equal(redrawn[name], adapter.lora_A.weight) for name, adapter in adapters_of(twin))
    q_proj = [a for name, a in redrawn.items() if "q_proj" in name]
    assert len(q_proj) == 2 and not torch.equal(q_proj[0], q_proj[1])  # same shape, different layers


def test_merge_folds_in_the_accumulator():
    model = adapted_lm({**SPEC, "modalities": ["text"], "stage_steps": 2})
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".mmadapt." not in n}
    train(model, steps=5, lr=5e-2)
    assert all(a.delta_acc.abs().sum() > 0 and a.lora_B.weight.abs().sum() > 0 for _, a in adapters_of(model))
    before = text_logits(model)
    merge(model)
    torch.testing.assert_close(text_logits(model), before, atol=1e-5, rtol=0)
    unmerge(model)
    for name, weight in weights.items():
        torch.testing.assert_close(model.get_parameter(name), weight, atol=1e-6, rtol=0)


def test_save_load_restores_the_accumulator():
    model = adapted_lm({**SPEC, "stage_steps": 2})
    train(model, steps=5, lr=5e-2)
    fresh = adapted_lm({**SPEC, "stage_steps": 2})
    result = fresh.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(image_logits(fresh), image_logits(model))
    assert not torch.equal(image_logits(adapted_lm({**SPEC, "stage_steps": 2})), image_logits(model))


def test_text_path_is_the_base_model_after_stages():
    model = adapted_lm({**SPEC, "stage_steps": 2})
    train(model, steps=5, lr=5e-2)
    assert torch.equal(text_logits(model), text_logits(tiny_causal_lm("llama").train()))


@pytest.mark.parametrize("restart", [True, False])
def test_lr_schedule_restarts_per_stage_unless_turned_off(restart):
    hooks = TrainingHooks(adapted_lm({**SPEC, "restart_lr": restart}))
    assert hooks.lr_cycle() == (SPEC["stage_steps"] if restart else None)


def test_forward_under_a_bf16_engine_keeps_the_accumulator_fp32():
    """DeepSpeed's bf16 engine casts parameters, not buffers."""
    model = adapted_lm(SPEC)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    for _, adapter in adapters_of(model):
        adapter.delta_acc.normal_(std=0.1)
    logits = image_logits(model)
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
    assert all(adapter.delta_acc.dtype == torch.float32 for _, adapter in adapters_of(model))
