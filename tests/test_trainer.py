"""Trainer pieces that need no engine: data order, schedule."""

import mmadapt
from mmadapt.trainer import _rank_batches, lr_factor
from tests.helpers import REPO


def _cfg(*overrides):
    return mmadapt.load_config(REPO / "configs" / "xcomposer.yaml", ["model=models/tiny.yaml", "train.align_steps=0", *overrides])


def test_rank_batches_are_disjoint_deterministic_and_resumable():
    cfg = _cfg("train.batch_size=4", "train.max_steps=20", "train.seed=3")
    lengths = [10 + (i * 7) % 23 for i in range(50)]
    ranks = [list(_rank_batches(lengths, cfg, rank, 2, 0)) for rank in range(2)]
    assert all(len(batches) == 20 and all(len(b) == 4 for b in batches) for batches in ranks)
    per_epoch = 50 // 8
    for step in range(per_epoch):
        assert not set(ranks[0][step]) & set(ranks[1][step])
    epoch0 = [i for r in ranks for b in r[:per_epoch] for i in b]
    assert len(set(epoch0)) == len(epoch0) == per_epoch * 8
    assert list(_rank_batches(lengths, cfg, 1, 2, 7)) == ranks[1][7:]
    assert list(_rank_batches(lengths, cfg, 1, 2, 0)) == ranks[1]


def test_length_grouping_reduces_padding():
    lengths = [10 + (i * 37) % 90 for i in range(512)]

    def padding(cfg):
        batches = _rank_batches(lengths, cfg, 0, 1, 0)
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    grouped = padding(_cfg("train.batch_size=16", "train.max_steps=32"))
    plain = padding(_cfg("train.batch_size=16", "train.max_steps=32", "data.group_by_length=false"))
    assert grouped < plain / 4


def test_alignment_stage_batches_are_not_grouped_by_length():
    cfg = _cfg("train.batch_size=16", "train.max_steps=32")
    lengths = [10 + (i * 37) % 90 for i in range(512)]
    plain = list(_rank_batches(lengths, _cfg("train.batch_size=16", "train.max_steps=32", "data.group_by_length=false"), 0, 1, 0))
    grouped = list(_rank_batches(lengths, cfg, 0, 1, 0))

    staged = list(_rank_batches(lengths, cfg, 0, 1, 0, aligning=20))

    assert staged[:20] == plain[:20] and staged[20:] == grouped[20:]
    assert list(_rank_batches(lengths, cfg, 0, 1, 25, aligning=20)) == staged[25:]
    opted_in = _cfg("train.batch_size=16", "train.max_steps=32", "data.group_alignment_by_length=true")
    assert list(_rank_batches(lengths, opted_in, 0, 1, 0, aligning=20)) == grouped


def test_warmup_then_cosine_to_min_ratio():
    cfg = _cfg("train.max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1")
    factors = [lr_factor(step, cfg.train) for step in range(101)]
    assert factors[0] < factors[5] < factors[9] < 1.0 and factors[10] == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert abs(factors[100] - 0.1) < 1e-9
