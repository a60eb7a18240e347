from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from glimr.data.samplers import (ClassBalanced, GroupSizeBatchSampler, RandomOrder, aspect_groups, group_size,
                                 split_key)


def test_group_size_keeps_aspect_and_divisor():
    assert group_size(4 / 3, 512) == (512, 384)
    assert group_size(3 / 4, 512) == (384, 512)
    assert group_size(1.0, 384) == (384, 384)
    w, h = group_size(1.5, 500, divisor=32)
    assert w % 32 == 0 and h % 32 == 0 and abs(w / h - 1.5) < 0.15
    assert group_size(50.0, 256) == (256, 32)     # never below the divisor
    with pytest.raises(ValueError):
        group_size(0.0, 256)


def test_aspect_groups_split_by_quantiles():
    aspects = [0.75] * 10 + [1.0] * 5 + [1.33] * 20 + [1.5] * 15
    gid, reps = aspect_groups(aspects, 3)
    assert len(set(gid)) == 3
    for g in range(3):  # every group is a contiguous range of aspect ratios
        members = np.array(aspects)[gid == g]
        others = np.array(aspects)[gid != g]
        assert not ((others > members.min()) & (others < members.max())).any()
        assert members.min() <= reps[g] <= members.max()
    same, _ = aspect_groups([1.33] * 8, 4)  # identical ratios share one group
    assert len(set(same)) == 1


def _aspects(n=103, seed=0):
    return np.random.default_rng(seed).choice([0.67, 0.75, 1.0, 1.33, 1.5], size=n)


def test_group_size_batches_have_one_size_and_cover_everything():
    aspects = _aspects()
    s = GroupSizeBatchSampler(RandomOrder(len(aspects), seed=1), aspects, batch_size=8, long_side=256,
                              n_groups=3, drop_last=False)
    seen = []
    for batch in s:
        sizes = {(w, h) for _, w, h in batch}
        assert len(sizes) == 1 and 1 <= len(batch) <= 8
        w, h = sizes.pop()
        assert max(w, h) == 256
        for i, _, _ in batch:  # the group's size follows the item's aspect ratio
            assert abs(np.log(w / h) - np.log(aspects[i])) < 0.45
        seen += [i for i, _, _ in batch]
    assert sorted(seen) == list(range(len(aspects)))


def test_drop_last_gives_full_batches_only():
    aspects = _aspects()
    s = GroupSizeBatchSampler(len(aspects), aspects, batch_size=8, long_side=256, n_groups=3)
    assert all(len(b) == 8 for b in s) and len(s) == len(list(s)) > 0


def test_orders_are_pure_functions_of_seed_and_epoch_and_resume_skips():
    aspects = _aspects()
    mk = lambda: GroupSizeBatchSampler(RandomOrder(len(aspects), seed=3), aspects, batch_size=4,  # noqa: E731
                                       long_side=128, n_groups=2, seed=3)
    a, b = mk(), mk()
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    full = list(a)
    a.set_epoch(2, start_batch=5)
    assert list(a) == full[5:] and len(a) == len(full) - 5


def test_ranks_get_disjoint_equal_shares():
    aspects = _aspects(200)
    shares = [list(GroupSizeBatchSampler(200, aspects, batch_size=4, long_side=128, n_groups=2, rank=r,
                                         world_size=3)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    ids = [i for s in shares for b in s for i, _, _ in b]
    assert len(ids) == len(set(ids))


def test_sizes_mode_groups_exact_sizes():
    sizes = [(64, 48)] * 9 + [(48, 64)] * 7
    s = GroupSizeBatchSampler(len(sizes), sizes=sizes, batch_size=3)
    for batch in s:
        assert len({sizes[i] for i, _, _ in batch}) == 1
        assert all((w, h) == sizes[i] for i, w, h in batch)


def test_class_balanced_draws_per_class():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 10)
    cb = ClassBalanced(labels, per_class=4, seed=0)
    idx = cb.indices(0)
    counts = Counter(labels[idx].tolist())
    assert counts == {0: 4, 1: 4, 2: 4}                # class 1 (3 images) is drawn with replacement
    assert len(set(idx[labels[idx] == 0].tolist())) == 4   # large classes without replacement
    assert not np.array_equal(cb.indices(0), cb.indices(1))
    assert np.array_equal(cb.indices(5), ClassBalanced(labels, per_class=4, seed=0).indices(5))
    g = ClassBalanced(labels, per_class=2, grouped=True).indices(0)
    assert all(labels[g[k]] == labels[g[k + 1]] for k in range(0, len(g), 2))   # P x K blocks
    with pytest.raises(ValueError):
        ClassBalanced([], per_class=2)


def test_group_size_sampler_over_class_balanced_source():
    labels = np.repeat(np.arange(10), 5)
    aspects = np.where(labels % 2 == 0, 1.33, 0.75)
    s = GroupSizeBatchSampler(ClassBalanced(labels, per_class=2), aspects, batch_size=4, long_side=128,
                              n_groups=2, drop_last=False)
    got = [i for b in s for i, _, _ in b]
    assert Counter(labels[got].tolist()) == {c: 2 for c in range(10)}


def test_split_key_reads_plain_indices_and_sampler_keys():
    assert split_key(7) == (7, None)
    assert split_key(np.int64(3)) == (3, None)
    assert split_key((5, 512, 384)) == (5, (512, 384))
    assert split_key([2, 384, 512]) == (2, (384, 512))
    with pytest.raises(ValueError):
        split_key((1, 2))
