"""The image alignment stage's readout loss: which tokens are targets, and what it scores."""

import torch
import torch.nn.functional as F

from mmadapt.losses import IGNORE, embedding_readout, first_answer_tokens


def test_first_answer_tokens_stop_at_the_first_gap_and_the_width():
    labels = torch.tensor([
        [IGNORE, 5, 6, IGNORE, 7, 8],
        [IGNORE, IGNORE, 3, 4, 5, 6],
        [IGNORE] * 6,
    ])

    targets = first_answer_tokens(labels, 3)

    assert targets.tolist() == [[5, 6, IGNORE], [3, 4, 5], [IGNORE] * 3]


def test_readout_is_cross_entropy_over_cosines_to_the_table():
    torch.manual_seed(0)
    table = torch.randn(50, 8)
    tokens = torch.randn(2, 3, 8)
    targets = torch.tensor([[4, 9, IGNORE], [IGNORE, 0, 49]])

    loss = embedding_readout(tokens, targets, table, 0.1)

    keep = targets != IGNORE
    cosines = F.cosine_similarity(tokens[keep][:, None], table[None], dim=-1)
    torch.testing.assert_close(loss, F.cross_entropy(cosines / 0.1, targets[keep]))


def test_readout_prefers_the_target_word_and_ignores_scale():
    torch.manual_seed(0)
    table = torch.randn(50, 8)
    targets = torch.tensor([[4, 9, 17]])
    right = embedding_readout(3.0 * table[targets], targets, table, 0.05)
    wrong = embedding_readout(table[targets.flip(1)], targets, table, 0.05)
    assert right < 0.01 < wrong


def test_readout_without_targets_is_zero_with_a_graph():
    tokens = torch.randn(1, 3, 8, requires_grad=True)
    loss = embedding_readout(tokens, torch.full((1, 3), IGNORE), torch.randn(50, 8), 0.05)
    loss.backward()
    assert loss.item() == 0.0 and tokens.grad is not None


def test_sampled_readout_is_cross_entropy_over_the_targets_and_the_drawn_rows():
    torch.manual_seed(0)
    table = torch.randn(50, 8)
    tokens = torch.randn(2, 3, 8)
    targets = torch.tensor([[4, 9, IGNORE], [IGNORE, 4, 49]])

    torch.manual_seed(1)
    loss = embedding_readout(tokens, targets, table, 0.1, negatives=6)
    torch.manual_seed(1)
    drawn = torch.randint(50, (6,))

    rows = sorted({4, 9, 49} | set(drawn.tolist()))
    keep = targets != IGNORE
    cosines = F.cosine_similarity(tokens[keep][:, None], table[rows][None], dim=-1)
    expected = F.cross_entropy(cosines / 0.1, torch.tensor([rows.index(t) for t in targets[keep].tolist()]))
    torch.testing.assert_close(loss, expected)
    assert loss < embedding_readout(tokens, targets, table, 0.1)  # fewer rows compete with the target


def test_readout_with_more_negatives_than_rows_uses_the_whole_table():
    table, tokens, targets = torch.randn(50, 8), torch.randn(1, 3, 8), torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(
        embedding_readout(tokens, targets, table, 0.1, negatives=50), embedding_readout(tokens, targets, table, 0.1)
    )
