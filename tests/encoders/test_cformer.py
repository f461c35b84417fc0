"""CFormer: exact token counts, at least one token, padding invariance, quantity loss, gradients."""

from __future__ import annotations

import pydantic
import pytest
import torch

from mmadapt.encoders.cformer import CFormer, CFormerConfig, quantity_loss
from mmadapt.errors import InputError

WIDTH = 16


def make_cformer(seed: int = 0, **overrides) -> CFormer:
    torch.manual_seed(seed)
    sizes = {"width": WIDTH, "pre_layers": 1, "post_layers": 1, "heads": 2, "ffn": 32}
    return CFormer(CFormerConfig(**{**sizes, **overrides}))


def padded_batch(generator: torch.Generator, batch: int, time: int, scale: float = 1.0):
    """Frames with random real lengths; padding holds large finite garbage that must not matter."""
    hidden = scale * torch.randn(batch, time, WIDTH, generator=generator)
    real = torch.randint(1, time + 1, (batch,), generator=generator)
    frame_mask = torch.arange(time)[None] < real[:, None]
    hidden[~frame_mask] = 1e3 * torch.randn(int((~frame_mask).sum()), WIDTH, generator=generator)
    return hidden, frame_mask


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])  # 30: saturated sigmoids, alphas near 0 and 1
def test_training_gives_exactly_the_target_count_on_many_rows(scale):
    model = make_cformer().train()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        hidden, frame_mask = padded_batch(g, 128, 40, scale)
        targets = torch.randint(1, 120, (128,), generator=g)  # up to 3 tokens per frame

        out = model(hidden, frame_mask, targets)

        assert torch.equal(out.lengths, targets)
        assert out.tokens.shape == (128, int(targets.max()), WIDTH)


def test_inference_count_is_the_rounded_alpha_sum():
    model = make_cformer().eval()
    hidden, frame_mask = padded_batch(torch.Generator().manual_seed(2), 16, 60)

    with torch.no_grad():
        out = model(hidden, frame_mask)

    assert torch.equal(out.lengths, torch.round(out.alpha_sum).long().clamp_min(1))
    assert out.tokens.shape[1] == int(out.lengths.max())


def test_silence_gives_at_least_one_token():
    model = make_cformer().eval()
    frame_mask = torch.ones(3, 25, dtype=torch.bool)
    frame_mask[1, 1:] = False  # a single frame

    with torch.no_grad():
        out = model(torch.zeros(3, 25, WIDTH), frame_mask)

    assert (out.lengths >= 1).all() and out.tokens.shape[1] >= 1


def test_alphas_that_underflow_to_zero_still_give_the_requested_count():
    model = make_cformer(pre_layers=0).eval()
    with torch.no_grad():
        model.alpha_head.bias.fill_(-1e4)  # sigmoid(-1e4) == 0 in float32
    hidden, frame_mask = padded_batch(torch.Generator().manual_seed(3), 4, 10)

    with torch.no_grad():
        inferred = model(hidden, frame_mask)
        forced = model(hidden, frame_mask, torch.tensor([1, 2, 7, 30]))

    assert inferred.alpha_sum.tolist() == [0.0] * 4 and inferred.lengths.tolist() == [1] * 4
    assert forced.lengths.tolist() == [1, 2, 7, 30]
    assert torch.isfinite(forced.tokens).all()


@pytest.mark.parametrize("with_targets", [False, True])
def test_padding_does_not_change_real_rows(with_targets):
    model = make_cformer(post_layers=2).eval()
    g = torch.Generator().manual_seed(4)
    hidden, frame_mask = padded_batch(g, 5, 30)
    targets = torch.randint(1, 20, (5,), generator=g) if with_targets else None

    with torch.no_grad():
        batched = model(hidden, frame_mask, targets)
        for row in range(5):
            real = int(frame_mask[row].sum())
            alone = model(hidden[row : row + 1, :real], frame_mask[row : row + 1, :real],
                          None if targets is None else targets[row : row + 1])
            n = int(alone.lengths)
            assert int(batched.lengths[row]) == n
            torch.testing.assert_close(batched.alpha_sum[row], alone.alpha_sum[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched.tokens[row, :n], alone.tokens[0], rtol=1e-4, atol=1e-5)
            assert not batched.tokens[row, n:].any()  # zero past the row's length


def test_quantity_loss_value():
    alpha_sum = torch.tensor([3.0, 5.0, 1.5])
    targets = torch.tensor([2, 5, 3])

    assert quantity_loss(alpha_sum, targets).item() == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert quantity_loss(alpha_sum, targets, threshold=0.5).item() == pytest.approx((2 + 1 + 0) / 3)
    with pytest.raises(InputError, match="target lengths"):
        quantity_loss(alpha_sum, torch.tensor([2, 0, 3]))


@pytest.mark.parametrize("pre_layers", [0, 2])
def test_gradients_reach_every_parameter(pre_layers):
    model = make_cformer(pre_layers=pre_layers).train()
    g = torch.Generator().manual_seed(5)
    hidden, frame_mask = padded_batch(g, 4, 20)
    targets = torch.tensor([3, 1, 8, 5])

    out = model(hidden, frame_mask, targets)
    loss = (out.tokens * torch.randn(out.tokens.shape, generator=g)).sum() + quantity_loss(out.alpha_sum, targets)
    loss.backward()

    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_token_loss_alone_trains_the_alpha_head():
    # gradients reach the alpha head through the CIF weights, not only through the quantity loss
    model = make_cformer(pre_layers=0).train()
    hidden, frame_mask = padded_batch(torch.Generator().manual_seed(6), 2, 12)

    out = model(hidden, frame_mask, torch.tensor([4, 2]))
    out.tokens.pow(2).sum().backward()

    assert model.alpha_head.weight.grad.abs().sum() > 0


def test_bfloat16_model_keeps_exact_counts():
    model = make_cformer().to(torch.bfloat16).train()
    hidden, frame_mask = padded_batch(torch.Generator().manual_seed(7), 32, 30)
    targets = torch.randint(1, 40, (32,))

    out = model(hidden.to(torch.bfloat16), frame_mask, targets)

    assert torch.equal(out.lengths, targets) and out.tokens.dtype == torch.bfloat16


def test_bad_inputs_raise():
    model = make_cformer()
    hidden = torch.randn(2, 5, WIDTH)
    empty_row = torch.tensor([[True] * 5, [False] * 5])
    with pytest.raises(InputError, match=r"speech items \[1\] have no frames"):
        model(hidden, empty_row)
    with pytest.raises(InputError, match="target token counts"):
        model(hidden, torch.ones(2, 5, dtype=torch.bool), torch.tensor([3, 0]))
    with pytest.raises(pydantic.ValidationError, match="cformer.heads"):
        CFormerConfig(width=WIDTH, heads=3)
    with pytest.raises(pydantic.ValidationError, match="cformer.tail_threshold"):
        CFormerConfig(width=WIDTH, heads=2, threshold=0.5, tail_threshold=0.6)


def test_alpha_head_starts_at_uniform_alpha_init():
    model = make_cformer(alpha_init=0.2).eval()
    hidden, frame_mask = padded_batch(torch.Generator().manual_seed(5), 3, 20)
    with torch.no_grad():
        out = model(hidden, frame_mask)
    torch.testing.assert_close(out.alpha_sum, 0.2 * frame_mask.sum(1).float())
