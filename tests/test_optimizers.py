"""The optimizer registry and Flora's optimizer form (mmadapt.optim.flora) on full weights."""

import copy
import math

import pytest
import torch
from torch import nn

from mmadapt.adapters import adapter_parameters, inject
from mmadapt.errors import InputError
from mmadapt.optim import build_optimizer
from mmadapt.optim.flora import Flora, compress, compressed_momentum, decompress, next_seed, projection
from tests.adapters.hook_loop import VOCAB, batch
from tests.helpers import one_thread  # noqa: F401  (fixture)
from tests.conftest import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

WIDE, TALL = (8, 20), (20, 8)


@pytest.mark.parametrize("shape, expected", [(WIDE, (4, 8)), (TALL, (8, 4))])
def test_same_seed_gives_the_same_projection_on_the_short_side(shape, expected):
    P = projection(shape, 4, seed=11)
    assert P.shape == expected
    assert torch.equal(P, projection(shape, 4, seed=11))
    assert not torch.equal(P, projection(shape, 4, seed=12))
    assert compress(torch.randn(shape), 4, seed=11).shape == ((4, 20) if shape == WIDE else (20, 4))


@pytest.mark.parametrize("shape", [WIDE, TALL])
def test_decompressed_compression_is_unbiased_with_error_falling_as_one_over_sqrt_samples(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def error(samples: int) -> float:  # averaged over 4 disjoint seed sets
        errors = []
        for first in range(0, 400_000, 100_000):
            mean = sum(decompress(compress(G, 4, s), shape, 4, s) for s in range(first, first + samples)) / samples
            errors.append((torch.linalg.norm(mean - G) / torch.linalg.norm(G)).item())
        return sum(errors) / len(errors)

    few, many = error(32), error(512)
    assert many < 0.1
    assert 2.5 < few / many < 6.5  # sqrt(512 / 32) = 4


def test_compressed_momentum_matches_the_uncompressed_one_in_expectation():
    """Over a fixed set of seeds the mean direction is the plain EMA, resamples (kappa=2) included.

    Each entry's error is measured in standard errors of its mean; their mean square is about 1
    when unbiased (a momentum that skipped the transfer at resamples scores 60-180 here).
    """
    beta1, rank, kappa, trials = 0.9, 4, 2, 500
    updates = [torch.randn(WIDE, generator=torch.Generator().manual_seed(t)) for t in range(5)]
    directions = [[] for _ in updates]
    for trial in range(trials):
        state = {"seed": trial, "exp_avg": torch.zeros(rank, WIDE[1])}
        for step, update in enumerate(updates, start=1):
            directions[step - 1].append(compressed_momentum(state, update, step, beta1, rank, kappa))
        assert state["seed"] == next_seed(next_seed(trial))  # resampled after steps 2 and 4
    plain = torch.zeros(WIDE)
    for step, (update, samples) in enumerate(zip(updates, directions), start=1):
        plain = beta1 * plain + (1 - beta1) * update
        samples = torch.stack(samples)  # (trials, 8, 20)
        if step == 1:  # no history yet: exact
            assert torch.allclose(samples, plain.expand_as(samples))
            continue
        z = (samples.mean(dim=0) - plain) / (samples.std(dim=0) / math.sqrt(trials))
        assert (z**2).mean() < 2.0, step


class Tiny(nn.Module):
    """An embedding, a compressible matrix with a bias, and a too-wide matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.hidden, self.head = nn.Embedding(40, 8), nn.Linear(8, 12), nn.Linear(12, 60, bias=False)

    def loss(self, step: int) -> torch.Tensor:
        tokens = torch.randint(0, 40, (16,), generator=torch.Generator().manual_seed(step))
        return nn.functional.cross_entropy(self.head(torch.tanh(self.hidden(self.embed(tokens)))), tokens.roll(1))


def groups_of(model: nn.Module, lr: float = 1e-2) -> list[dict]:
    """The trainer's grouping: weight decay 0.1 on matrices only."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "lr": lr, "weight_decay": 0.1}, {"params": vectors, "lr": lr, "weight_decay": 0.0}]


def flora_on(model: nn.Module, lr: float = 1e-2, **args) -> Flora:
    return build_optimizer("flora_opt", groups_of(model, lr), model, {"rank": 4, **args}, zero_stage=0)


def test_state_layout_compresses_only_eligible_matrices():
    model = Tiny()
    optimizer = flora_on(model)
    model.loss(0).backward()
    optimizer.step()
    state = optimizer.state
    assert state[model.hidden.weight]["exp_avg"].shape == (12, 4)  # 12 x 8: compressed on its short side
    assert state[model.embed.weight]["exp_avg"].shape == (40, 8)  # embedding: uncompressed
    assert state[model.head.weight]["exp_avg"].shape == (60, 12)  # aspect ratio 5 > 4: uncompressed
    assert state[model.head.weight]["exp_avg_sq_row"].shape == (60,)  # ... but still factored
    assert state[model.hidden.bias]["exp_avg_sq"].shape == (12,)  # vectors: full second moment


def adafactor_flora_reference(param, grad, step, memory, lr, weight_decay, rank, kappa, beta1=0.9):
    """flora-opt's step for one compressed matrix, written out (fp64): factored second moment,
    compressed momentum with a projection P on the short side, RMS clipping, relative step."""
    m, n = param.shape
    beta2 = 1 - step**-0.8
    squared = grad**2 + 1e-30
    memory["row"] = beta2 * memory["row"] + (1 - beta2) * squared.mean(dim=1)
    memory["col"] = beta2 * memory["col"] + (1 - beta2) * squared.mean(dim=0)
    update = grad / torch.sqrt(torch.outer(memory["row"] / memory["row"].mean(), memory["col"]))

    def P(seed):  # m >= n here: the right projection (n, rank)
        return projection((m, n), rank, seed).double()

    direction = (1 - beta1) * update + beta1 * memory["c"] @ P(memory["seed"]).T
    if step % kappa == 0:
        new_seed = next_seed(memory["seed"])
        memory["c"] = memory["c"] @ P(memory["seed"]).T @ P(new_seed)
        memory["seed"] = new_seed
    memory["c"] = beta1 * memory["c"] + (1 - beta1) * update @ P(memory["seed"])
    direction = direction / max(1.0, (direction.norm() / math.sqrt(direction.numel())).item())
    scaled_lr = lr * max(1e-3, (param.norm() / math.sqrt(param.numel())).item())
    return param * (1 - weight_decay * scaled_lr) - scaled_lr * direction


def test_flora_step_matches_a_written_out_reference():
    model = Tiny()
    optimizer = flora_on(model, lr=0.05, kappa=2)
    param, memory = model.hidden.weight, None
    for step in range(1, 4):  # steps 1, 2 (resample), 3
        model.loss(step).backward()
        before, grad = param.detach().double().clone(), param.grad.double().clone()
        optimizer.step()
        optimizer.zero_grad()
        if memory is None:  # the first seed is the optimizer's (from the parameter's position)
            memory = {"seed": optimizer.state[param]["seed"], "c": torch.zeros(12, 4, dtype=torch.float64)}
            memory.update(row=torch.zeros(12, dtype=torch.float64), col=torch.zeros(8, dtype=torch.float64))
        expected = adafactor_flora_reference(before, grad, step, memory, lr=0.05, weight_decay=0.1, rank=4, kappa=2)
        torch.testing.assert_close(param.double(), expected, rtol=1e-5, atol=1e-7, msg=f"step {step}")
        assert optimizer.state[param]["seed"] == memory["seed"]


def lm_with_adapter(seed: int = 0) -> nn.Module:
    model = tiny_causal_lm(seed=seed).train()
    torch.manual_seed(seed + 1)
    inject(model, [{"type": "lora", "modalities": ["text"], "targets": ["q_proj"], "r": 2, "alpha": 4}])
    return model


def lm_loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens, _, targets = batch(step)
    return nn.functional.cross_entropy(model(tokens).logits.reshape(-1, VOCAB), targets.reshape(-1))


def test_adapter_parameters_take_plain_adamw_steps():
    flora_model, adamw_model = lm_with_adapter(), lm_with_adapter()
    optimizer = build_optimizer("flora_opt", groups_of(flora_model), flora_model, {"rank": 4}, zero_stage=0)
    adapters = list(adapter_parameters(adamw_model).values())
    reference = torch.optim.AdamW([{"params": adapters, "lr": 1e-2, "weight_decay": 0.1}])
    for model, opt in ((flora_model, optimizer), (adamw_model, reference)):  # one step: then the LMs differ
        lm_loss(model, 0).backward()
        opt.step()
    for name, param in adapter_parameters(flora_model).items():
        torch.testing.assert_close(param, adapter_parameters(adamw_model)[name], rtol=0, atol=1e-7)
    q_proj = flora_model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[q_proj]["exp_avg"].shape == (32, 4)  # the LM's own weights: Flora


def run(model: nn.Module, first: int, last: int, state: dict | None = None) -> tuple[list[tuple[float, float]], dict]:
    """Flora steps ``first .. last - 1``; each step's loss before and after its update, and the final state."""
    optimizer = build_optimizer("flora_opt", groups_of(model), model, {"rank": 4, "kappa": 2}, zero_stage=0)
    if state is not None:
        optimizer.load_state_dict(state)
    losses = []
    for step in range(first, last):
        loss = lm_loss(model, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            losses.append((loss.item(), lm_loss(model, step).item()))
    return losses, copy.deepcopy(optimizer.state_dict())


def test_each_step_descends_and_a_resumed_run_repeats_exactly():
    straight = lm_with_adapter()
    straight_losses, _ = run(straight, 0, 5)  # resamples after steps 2 and 4
    assert all(after < before for before, after in straight_losses), straight_losses

    first_half = lm_with_adapter()
    _, saved = run(first_half, 0, 3)
    resumed = lm_with_adapter(seed=5)
    resumed.load_state_dict(first_half.state_dict())
    resumed_losses, _ = run(resumed, 3, 5, saved)
    assert resumed_losses == straight_losses[3:]
    for (name, param), other in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(param, other), name


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("name", ["lora_pro", "flora_opt"])
def test_zero_stages_above_0_are_refused_with_the_stage_named(name, stage):
    model = lm_with_adapter()
    refused = rf"train\.optimizer={name} supports deepspeed\.zero_stage 0 only .*got {stage}$"
    with pytest.raises(InputError, match=refused):
        build_optimizer(name, groups_of(model), model, {}, zero_stage=stage)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"rnk": 4}, r"train\.optimizer_args: flora_opt takes rank, kappa, .*, not rnk"),
        ({"rank": 0}, r"train\.optimizer_args\.rank must be a positive integer, got 0"),
        ({"kappa": 1.5}, r"train\.optimizer_args\.kappa must be a positive integer, got 1\.5"),
    ],
)
def test_bad_flora_args_are_refused_by_key(args, message):
    model = lm_with_adapter()
    with pytest.raises(InputError, match=message):
        build_optimizer("flora_opt", groups_of(model), model, args, zero_stage=0)
