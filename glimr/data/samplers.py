"""Batch samplers for training: GLAM's "group-size" batches and class-balanced sampling.

Group-size sampling (GLAM Sec. 4.4 / Table 8, after Yokoo et al. 2020): images are split into groups of
similar aspect ratio; a batch holds images of one group only, all resized to that group's size, so that
each image keeps (nearly) its own aspect ratio while the batch stays one tensor.

    source = RandomOrder(len(ds), seed)                       # or ClassBalanced(labels, per_class=4)
    batches = GroupSizeBatchSampler(source, aspects, batch_size=64, long_side=512, n_groups=5)
    loader = DataLoader(ds, batch_sampler=batches, ...)       # ds[(index, w, h)] -> image resized to (w, h)

Every order is a pure function of (seed, epoch), so a resumed run sees the same batches: call
``set_epoch(epoch, start_batch)`` to continue an epoch after its first `start_batch` batches. For
multi-process training (DDP) each rank takes every `world_size`-th batch of the same global list.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Sampler


def group_size(aspect: float, long_side: int, divisor: int = 32) -> tuple[int, int]:
    """(w, h) with the longest side `long_side` and the other side matching `aspect` = w / h, rounded to a
    multiple of `divisor` (the backbone's stride) and at least `divisor`."""
    if aspect <= 0 or not math.isfinite(aspect):
        raise ValueError(f"bad aspect ratio {aspect}")
    if aspect >= 1:
        w, h = long_side, long_side / aspect
    else:
        w, h = long_side * aspect, long_side
    rnd = lambda v: max(divisor, int(round(v / divisor)) * divisor)  # noqa: E731
    return rnd(w), rnd(h)


def split_key(key) -> tuple[int, tuple[int, int] | None]:
    """A dataset key: a plain index, or (index, w, h) from `GroupSizeBatchSampler` -> (index, (w, h) or None)."""
    if isinstance(key, (tuple, list)):
        index, w, h = (int(v) for v in key)
        return index, (w, h)
    return int(key), None


def aspect_groups(aspects: Sequence[float], n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Split items into up to `n_groups` groups of similar aspect ratio and similar sizes: items sorted by
    aspect ratio are cut near every k/n_groups of their count, at a change of value (items with identical
    aspect ratios always share a group). Returns (group id per item, representative aspect ratio per group:
    the group's median)."""
    a = np.log(np.asarray(aspects, dtype=np.float64))
    if a.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    vals, counts = np.unique(a, return_counts=True)
    cum = np.cumsum(counts)                              # items up to and including each distinct value
    cuts = set()
    for k in range(1, max(1, int(n_groups))):
        j = int(np.argmin(np.abs(cum[:-1] - k * a.size / n_groups))) if len(vals) > 1 else None
        if j is not None:
            cuts.add(j)
    edges = np.array(sorted((vals[j] + vals[j + 1]) / 2 for j in cuts))
    gid = np.searchsorted(edges, a, side="right")
    reps = np.array([math.exp(float(np.median(a[gid == g]))) for g in range(len(edges) + 1)])
    return gid.astype(np.int64), reps


class RandomOrder:
    """Every index once per epoch, shuffled by (seed, epoch)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle

    def indices(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, int(epoch), 1]).permutation(self.n)


class ClassBalanced:
    """Class-balanced order: each epoch draws `per_class` samples of every class (without replacement
    where the class has enough, else with), so that large classes do not dominate (GLDv2 is long-tailed).
    `grouped=True` keeps each class's draws consecutive (P x K batches, for pair losses); else shuffled."""

    def __init__(self, labels: Sequence[int], per_class: int = 4, seed: int = 0, grouped: bool = False):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("ClassBalanced needs at least one labelled sample")
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, not {per_class}")
        self.classes = np.unique(labels)
        self.members = [np.flatnonzero(labels == c) for c in self.classes]
        self.per_class, self.seed, self.grouped = int(per_class), int(seed), grouped
        self.n = len(self.classes) * self.per_class

    def indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(epoch), 2])
        order = rng.permutation(len(self.classes))
        draws = []
        for c in order:
            m = self.members[c]
            draws.append(rng.choice(m, self.per_class, replace=len(m) < self.per_class))
        out = np.concatenate(draws)
        return out if self.grouped else rng.permutation(out)


class GroupSizeBatchSampler(Sampler):
    """Batches of one aspect-ratio group each; yields lists of (index, w, h) with (w, h) the group's size.

    source:     RandomOrder / ClassBalanced (anything with `.indices(epoch)`), or an int n (RandomOrder(n)).
    aspects:    aspect ratio (w / h) of every dataset item.
    long_side:  the longest side of the group sizes; `divisor` rounds the other side.
    n_groups:   number of aspect-ratio groups (1 = one fixed size for all).
    sizes:      instead of aspects/long_side: the exact (w, h) of every item (e.g. cached feature maps);
                items of equal size form a group.
    drop_last:  drop each group's incomplete last batch (default), else yield it.
    Batches are formed in the order of the source: an item joins its group's buffer, and a full buffer
    becomes a batch (as Detectron's aspect-ratio grouping); the epoch's batch list is then shuffled.
    """

    def __init__(self, source, aspects: Sequence[float] | None = None, batch_size: int = 32,
                 long_side: int = 512, n_groups: int = 5, divisor: int = 32, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 sizes: Sequence[tuple[int, int]] | None = None):
        self.source = RandomOrder(source, seed) if isinstance(source, int) else source
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if sizes is not None:
            keys = [tuple(int(v) for v in s) for s in sizes]
            uniq = sorted(set(keys))
            self.group_of = np.array([uniq.index(k) for k in keys], dtype=np.int64)
            self.group_sizes = uniq
        else:
            if aspects is None:
                raise ValueError("GroupSizeBatchSampler needs aspects or sizes")
            self.group_of, reps = aspect_groups(aspects, n_groups)
            self.group_sizes = [group_size(float(r), long_side, divisor) for r in reps]
        self.batch_size, self.drop_last, self.seed = int(batch_size), drop_last, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def size_of(self, index: int) -> tuple[int, int]:
        return self.group_sizes[self.group_of[index]]

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """All batches of an epoch for this rank (before `start_batch` is applied)."""
        buffers: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for i in self.source.indices(epoch):
            g = int(self.group_of[i])
            buf = buffers.setdefault(g, [])
            buf.append(int(i))
            if len(buf) == self.batch_size:
                batches.append(buf)
                buffers[g] = []
        if not self.drop_last:
            batches.extend(b for b in buffers.values() if b)
        order = np.random.default_rng([self.seed, int(epoch), 3]).permutation(len(batches))
        batches = [batches[k] for k in order]
        if self.world_size > 1:  # every rank the same number of batches
            per = len(batches) // self.world_size
            batches = batches[self.rank: per * self.world_size: self.world_size]
        return [[(i, *self.group_sizes[self.group_of[i]]) for i in b] for b in batches]

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.start_batch:]

    def __len__(self) -> int:
        return max(0, len(self.epoch_batches(self.epoch)) - self.start_batch)
