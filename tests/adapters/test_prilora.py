import pytest
import torch

from mmadapt.adapters import adapters_of, inject, parse_spec
from mmadapt.adapters.prilora import PRILoRA
from mmadapt.compat import set_activation_checkpointing
from mmadapt.errors import InputError
from mmadapt.hooks import StepContext
from tests.adapters.hook_loop import adapted_lm, step_loss, text_logits, train
from tests.conftest import tiny_causal_lm

SPEC = {"type": "prilora", "r": 4, "r_min": 2, "alpha": 8, "targets": ["q_proj", "down_proj"]}


@pytest.mark.parametrize("blocks", [2, 5, 6, 12])
@pytest.mark.parametrize(("r", "r_min"), [(8, 4), (8, 1), (5, 2), (3, 3)])
def test_rank_schedule_rises_linearly_and_averages_r(blocks, r, r_min):
    spec = parse_spec({"type": "prilora", "r": r, "r_min": r_min})
    names = [f"model.layers.{i}.{m}" for i in range(blocks) for m in ("self_attn.q_proj", "mlp.down_proj")]
    ranks = [PRILoRA.layer_spec(spec, f"model.layers.{i}.mlp.down_proj", names).r for i in range(blocks)]
    assert ranks[0] == r_min and ranks[-1] == 2 * r - r_min
    assert all(a <= b for a, b in zip(ranks, ranks[1:]))
    assert sum(ranks) == r * blocks
    line = [r_min + 2 * (r - r_min) * depth / (blocks - 1) for depth in range(blocks)]
    assert all(abs(rank - exact) <= 0.5 for rank, exact in zip(ranks, line))


def test_each_block_gets_its_rank_and_scale():
    model = adapted_lm(SPEC)
    for name, adapter in adapters_of(model):
        rank = 2 if ".layers.0." in name else 6  # two blocks: r_min, then 2 r - r_min
        assert adapter.lora_A.weight.shape[0] == adapter.lora_B.weight.shape[1] == adapter.spec.r == rank, name
        assert adapter.scaling == SPEC["alpha"] / rank


def test_a_module_outside_numbered_blocks_is_refused():
    with pytest.raises(InputError, match=r"prilora targets \['lm_head'\]: module 'lm_head' is not inside a numbered"):
        inject(tiny_causal_lm(), [{**SPEC, "targets": ["lm_head"]}])


def test_ema_folds_the_steps_input_norms_once_per_step():
    adapter = next(a for _, a in adapters_of(adapted_lm({**SPEC, "ema_decay": 0.8})))
    ema = torch.rand(adapter.feature_ema.shape)
    adapter.feature_ema.copy_(ema)
    micro_batches = [torch.randn(5, 32), torch.randn(3, 32)]  # (N, in) rows of two micro-batches
    for x in micro_batches:
        adapter(x)
    adapter.eval()
    adapter(torch.randn(4, 32))  # evaluation rows are not statistics
    adapter.before_step(StepContext(step=0))
    norms = torch.cat(micro_batches).norm(dim=0)  # ||X_{:,j}|| over the step's rows
    torch.testing.assert_close(adapter.feature_ema, 0.8 * ema + 0.2 * norms, atol=1e-6, rtol=0)
    assert not adapter.input_sq_sum.any()
    assert "feature_ema" in adapter.state_dict() and "input_sq_sum" not in adapter.state_dict()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_counts_rows_once(reentrant):
    def counted(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = adapted_lm(SPEC)
        if checkpointing:
            set_activation_checkpointing(model, use_reentrant=reentrant)
        step_loss(model, StepContext(step=0)).backward()
        return {name: adapter.input_sq_sum.clone() for name, adapter in adapters_of(model)}

    plain, checkpointed = counted(False), counted(True)
    assert all(sums.any() for sums in plain.values())
    for name, sums in plain.items():
        torch.testing.assert_close(checkpointed[name], sums, atol=0, rtol=1e-6)


def test_pruning_zeroes_the_least_important_fraction_of_each_row():
    model = adapted_lm({**SPEC, "prune_every": 3, "prune_fraction": 0.25})
    train(model, steps=2, lr=5e-2)  # statistics for two steps, no pruning event yet
    magnitude_only_differs = False
    for name, adapter in adapters_of(model):
        a = adapter.lora_A.weight.detach().clone()
        importance = a.abs() * adapter.feature_ema  # S_ij, (r, in)
        adapter.after_step(StepContext(step=2))  # the third step ends: a pruning event
        pruned = adapter.lora_A.weight == 0
        assert (pruned.sum(dim=1) == int(0.25 * a.shape[1])).all(), name
        largest_pruned = importance.masked_fill(~pruned, -torch.inf).amax(dim=1)
        smallest_kept = importance.masked_fill(pruned, torch.inf).amin(dim=1)
        assert (largest_pruned < smallest_kept).all(), name
        assert torch.equal(adapter.lora_A.weight[~pruned], a[~pruned]), name
        by_magnitude = a.abs().argsort(dim=1)[:, : pruned.sum(dim=1)[0]]
        magnitude_only_differs |= not torch.equal(pruned, torch.zeros_like(pruned).scatter_(1, by_magnitude, True))
    assert magnitude_only_differs  # the input statistics change which entries go


def test_saved_statistics_reproduce_the_next_pruning():
    """A resumed run prunes as the uninterrupted one: the moving average is saved with the adapter."""
    spec = {**SPEC, "prune_every": 3, "prune_fraction": 0.25}
    model = adapted_lm(spec)
    train(model, steps=2, lr=5e-2)
    resumed = adapted_lm(spec)
    resumed.load_state_dict(model.state_dict())
    for each in (model, resumed):
        for _, adapter in adapters_of(each):
            adapter.after_step(StepContext(step=2))
    pairs = zip(adapters_of(model), adapters_of(resumed))
    assert all(torch.equal(a.lora_A.weight, b.lora_A.weight) for (_, a), (_, b) in pairs)


@pytest.mark.parametrize("persistent", [False, True])
def test_pruned_entries_regrow_unless_the_mask_persists(persistent):
    model = adapted_lm({**SPEC, "prune_every": 2, "prune_fraction": 0.25, "persistent_mask": persistent})
    zeros = {}

    def record_pruned(ctx: StepContext) -> None:
        if ctx.step == 1:  # the step that ended with a pruning event
            zeros.update({name: adapter.lora_A.weight == 0 for name, adapter in adapters_of(model)})

    train(model, steps=3, lr=5e-2, on_step=record_pruned)
    for name, adapter in adapters_of(model):
        assert zeros[name].any(), name
        still_zero = adapter.lora_A.weight[zeros[name]] == 0
        assert bool(still_zero.all()) if persistent else not still_zero.any(), name


def test_text_path_is_the_base_model_after_training():
    model = adapted_lm({**SPEC, "prune_every": 2, "prune_fraction": 0.5})
    train(model, steps=4, lr=5e-2, grad_accum=2)
    assert torch.equal(text_logits(model), text_logits(tiny_causal_lm("llama").train()))
