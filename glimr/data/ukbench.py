"""UKBench (Nister & Stewenius, CVPR 2006): 4 views per object, ``ukbenchNNNNN.jpg``, object = N // 4.

Every image is a query and the database is the whole set (the query included): the N-S score is the
average number of the query object's 4 images among the top 4 (see :func:`glimr.eval.metrics.ukbench_ns`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["UKBenchDataset", "load_ukbench"]

_NAME = re.compile(r"^ukbench(\d{5})\.(jpg|jpeg|png)$", re.IGNORECASE)


@dataclass
class UKBenchDataset:
    """``paths`` sorted by image number; ``objects[i]`` = number of image i // 4."""

    root: Path
    paths: list[Path]
    numbers: np.ndarray
    objects: np.ndarray

    name: str = "ukbench"
    title: str = "UKBench (N-S score, Nister & Stewenius CVPR 2006)"

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_objects(self) -> int:
        return len(np.unique(self.objects))


def load_ukbench(root: str | os.PathLike) -> UKBenchDataset:
    """Find the ``ukbenchNNNNN.jpg`` files in ``root`` (or ``root/full``); each object must have 4 views."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"UKBench folder {root} does not exist (pass --root to the folder of "
                                "ukbench00000.jpg ...)")
    folder = root / "full" if (root / "full").is_dir() else root
    found = []
    for f in os.listdir(folder):
        m = _NAME.match(f)
        if m:
            found.append((int(m.group(1)), folder / f))
    if not found:
        raise FileNotFoundError(f"no ukbenchNNNNN.jpg images in {folder}")
    found.sort()
    numbers = np.array([n for n, _ in found], dtype=np.int64)
    if len(np.unique(numbers)) != len(numbers):
        raise ValueError(f"{folder}: duplicate UKBench image numbers (several extensions?)")
    objects = numbers // 4
    _, counts = np.unique(objects, return_counts=True)
    if (counts != 4).any():
        bad = np.unique(objects)[counts != 4][:5].tolist()
        raise ValueError(f"{folder}: UKBench objects must have 4 views each; objects {bad} do not "
                         f"({len(found)} images found)")
    return UKBenchDataset(root=folder, paths=[p for _, p in found], numbers=numbers, objects=objects)
