"""cif() against a dense O(N·T) evaluation of the closed form, plus its edge cases."""

from __future__ import annotations

import pytest
import torch

from mmadapt.encoders.cif import cif


def reference_cif(
    hidden: torch.Tensor, alphas: torch.Tensor, threshold: float = 1.0, tail_threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w[n, t] = max(0, min(c_t, (n+1)θ) − max(c_{t−1}, nθ)) as a dense float64 matrix."""
    c = alphas.double().cumsum(1)  # (B, T)
    c_prev = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], 1)
    full = torch.floor(c[:, -1] / threshold).long()
    lengths = full.clone()
    if tail_threshold is not None:
        lengths += (c[:, -1] - full * threshold >= tail_threshold).long()
    n = torch.arange(int(lengths.max()), dtype=torch.float64)[None, :, None]  # (1, N, 1)
    w = torch.minimum(c[:, None], (n + 1) * threshold) - torch.maximum(c_prev[:, None], n * threshold)
    w = w.clamp_min(0) * (n < lengths[:, None, None])  # (B, N, T)
    return w @ hidden.double(), lengths


def random_batch(generator: torch.Generator, batch: int, time: int, width: int, scale: float):
    """Frames, and alphas with zero-alpha padding at each row's end and some zero frames inside."""
    hidden = torch.randn(batch, time, width, generator=generator, dtype=torch.float64)
    alphas = torch.rand(batch, time, generator=generator, dtype=torch.float64) * scale
    alphas[torch.rand(batch, time, generator=generator) < 0.1] = 0.0
    real = torch.randint(1, time + 1, (batch,), generator=generator)
    alphas[torch.arange(time)[None] >= real[:, None]] = 0.0
    return hidden, alphas


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.5])  # 3.5: frames fire up to three times
@pytest.mark.parametrize("threshold", [1.0, 0.8])
def test_matches_dense_reference(scale, threshold):
    g = torch.Generator().manual_seed(0)
    for trial in range(25):
        batch, time = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 90, (1,), generator=g))
        hidden, alphas = random_batch(g, batch, time, 5, scale)
        tail = None if trial % 2 else 0.4 * threshold

        tokens, lengths = cif(hidden, alphas, threshold, tail)

        expected, expected_lengths = reference_cif(hidden, alphas, threshold, tail)
        assert torch.equal(lengths, expected_lengths)
        torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-12)


def test_several_firings_in_one_frame_split_weight_exactly():
    hidden = torch.tensor([[[1.0], [10.0], [100.0]]], dtype=torch.float64)
    alphas = torch.tensor([[0.5, 2.75, 0.75]], dtype=torch.float64)  # c = 0.5, 3.25, 4.0

    tokens, lengths = cif(hidden, alphas)

    assert lengths.tolist() == [4]
    assert tokens[0, :, 0].tolist() == [0.5 * 1 + 0.5 * 10, 10.0, 10.0, 0.25 * 10 + 0.75 * 100]


def test_rows_without_a_full_firing_give_zero_tokens():
    hidden = torch.randn(2, 4, 3)
    alphas = torch.tensor([[0.2, 0.3, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])

    tokens, lengths = cif(hidden, alphas)

    assert tokens.shape == (2, 0, 3) and lengths.tolist() == [0, 0]


def test_zero_token_row_is_zero_padding_next_to_a_full_row():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    alphas = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.9, 0.9], [0.1, 0.2, 0.1, 0.0, 0.0, 0.0]], dtype=torch.float64)

    tokens, lengths = cif(hidden, alphas)

    assert lengths.tolist() == [5, 0]
    assert torch.equal(tokens[1], torch.zeros(5, 4, dtype=torch.float64))
    torch.testing.assert_close(tokens, reference_cif(hidden, alphas)[0], rtol=0, atol=1e-12)


def test_tail_fires_only_at_or_above_tail_threshold_and_keeps_the_remainder_weight():
    hidden = torch.ones(3, 3, 1, dtype=torch.float64)
    alphas = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.25], [0.5, 0.5, 0.0]], dtype=torch.float64)

    dropped, dropped_lengths = cif(hidden, alphas)
    tokens, lengths = cif(hidden, alphas, tail_threshold=0.5)

    assert dropped_lengths.tolist() == [1, 1, 1] and dropped.shape == (3, 1, 1)
    assert lengths.tolist() == [2, 1, 1]
    assert tokens[:, :, 0].tolist() == [[1.0, 0.5], [1.0, 0.0], [1.0, 0.0]]  # tail = remainder, not rescaled


def test_tail_threshold_must_lie_in_zero_to_threshold():
    hidden, alphas = torch.randn(1, 2, 3), torch.rand(1, 2)
    with pytest.raises(ValueError, match="tail_threshold"):
        cif(hidden, alphas, threshold=1.0, tail_threshold=1.5)
    with pytest.raises(ValueError, match="tail_threshold"):
        cif(hidden, alphas, tail_threshold=0.0)


def test_bad_alphas_and_shapes_raise():
    hidden = torch.randn(1, 3, 2)
    with pytest.raises(ValueError, match="non-negative"):
        cif(hidden, torch.tensor([[0.5, -0.1, 0.7]]))
    with pytest.raises(ValueError, match="finite"):
        cif(hidden, torch.tensor([[0.5, float("nan"), 0.7]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        cif(hidden, torch.rand(1, 4))
    with pytest.raises(ValueError, match="threshold"):
        cif(hidden, torch.rand(1, 3), threshold=0.0)


def test_empty_time_axis_gives_no_tokens():
    tokens, lengths = cif(torch.randn(2, 0, 3), torch.zeros(2, 0))
    assert tokens.shape == (2, 0, 3) and lengths.tolist() == [0, 0]


def test_gradcheck_hidden_and_alphas():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    # well inside (0, 1.6): no cumulative sum sits on a firing boundary, where w has a kink
    alphas = (0.2 + 1.4 * torch.rand(2, 7, generator=g, dtype=torch.float64)).requires_grad_()

    assert torch.autograd.gradcheck(lambda h, a: cif(h, a, 1.0, 0.3)[0], (hidden, alphas))


def test_alpha_gradient_matches_reference():
    g = torch.Generator().manual_seed(3)
    hidden, alphas = random_batch(g, 3, 50, 4, 1.2)
    upstream = torch.randn(3, 100, 4, generator=g, dtype=torch.float64)
    grads = []
    for fn in (cif, reference_cif):
        a = alphas.clone().requires_grad_()
        tokens, _ = fn(hidden, a, 1.0, 0.5)
        (tokens * upstream[:, : tokens.shape[1]]).sum().backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_hidden_keeps_dtype_and_accuracy(dtype):
    g = torch.Generator().manual_seed(4)
    hidden, alphas = random_batch(g, 3, 120, 8, 0.6)

    tokens, lengths = cif(hidden.to(dtype), alphas.float())

    expected, expected_lengths = reference_cif(hidden.to(dtype), alphas.float())
    assert tokens.dtype == dtype and torch.equal(lengths, expected_lengths)
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16: summed in float32, rounded once at the end
    torch.testing.assert_close(tokens.double(), expected, rtol=tol, atol=tol)


def test_bf16_gradients_reach_hidden_and_alphas_as_in_float32():
    """Under bf16 training the CFormer's alphas are bf16 too (CUDA has no bf16 embedding_bag
    backward to the weights: the sum runs in float32)."""
    g = torch.Generator().manual_seed(4)
    hidden, alphas = random_batch(g, 3, 120, 8, 0.6)
    upstream = torch.randn(3, 200, 8, generator=g)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, a = hidden.to(dtype).requires_grad_(), alphas.to(dtype).requires_grad_()
        tokens, _ = cif(h, a)
        (tokens.float() * upstream[:, : tokens.shape[1]]).sum().backward()
        assert h.grad.dtype == a.grad.dtype == dtype
        grads[dtype] = (h.grad.double(), a.grad.double())
    for exact, low in zip(grads[torch.float32], grads[torch.bfloat16]):
        torch.testing.assert_close(low, exact, rtol=5e-2, atol=5e-2)


def test_cumulative_sums_landing_exactly_on_boundaries():
    hidden = torch.tensor([[[1.0], [2.0], [4.0], [8.0], [16.0]]], dtype=torch.float64)
    alphas = torch.tensor([[0.5, 0.5, 0.0, 0.25, 1.75]], dtype=torch.float64)  # c = 0.5, 1, 1, 1.25, 3

    tokens, lengths = cif(hidden, alphas, tail_threshold=0.5)

    assert lengths.tolist() == [3]
    assert tokens[0, :, 0].tolist() == [0.5 * 1 + 0.5 * 2, 0.25 * 8 + 0.75 * 16, 16.0]


def test_long_input_does_not_drift():
    g = torch.Generator().manual_seed(6)
    time = 200_000
    alphas = (0.3 + 0.05 * torch.randn(1, time, generator=g)).clamp_min(0)  # float32
    hidden = torch.ones(1, time, 1)  # a token's value is the sum of its weights

    tokens, lengths = cif(hidden, alphas)

    total = alphas.double().sum()
    assert int(lengths) == int(torch.floor(total))
    assert abs(float(tokens[0, -1, 0]) - 1.0) < 1e-5
    assert (tokens[0, :, 0] - 1.0).abs().max() < 1e-5
