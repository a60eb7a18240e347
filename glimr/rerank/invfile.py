"""The inverted file of co-attention search (Hu & Bors 2023, sec. 5.2): visual word -> images.

Every indexed image carries its distinct visual words (``glimr.extract.local.Codebook``: the selected local
features, PCA-reduced, assigned to their nearest word). At search time only the images that share at least
one word with the query are scored; the others get the fallback score (the paper: zero).

The postings are a CSR pair (``offsets`` (n_words + 1,), ``postings`` int32 vids sorted by word then vid),
derived from the per-image word lists and cached next to the index as ``.npy`` + ``.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["InvertedFile"]


class InvertedFile:
    def __init__(self, offsets: np.ndarray, postings: np.ndarray, n_images: int):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.postings = np.asarray(postings, dtype=np.int32)
        self.n_images = int(n_images)

    @property
    def n_words(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_words(cls, words: np.ndarray, n_words: int, pad: int | None = None,
                   rows: np.ndarray | None = None) -> InvertedFile:
        """From per-image word lists ``words`` (M, W) (padded with ``pad``); ``rows``: the images to include
        (e.g. the live ones; default all). Image ids are row numbers of ``words``."""
        words = np.asarray(words)
        m = len(words)
        ids = np.arange(m, dtype=np.int32) if rows is None else np.sort(np.asarray(rows, dtype=np.int32))
        w = words[ids] if rows is not None else words
        per = w.shape[1] if w.ndim == 2 else 1
        flat = w.reshape(-1)
        ok = (flat != pad) if pad is not None else np.ones(len(flat), bool)
        if flat.dtype.kind == "i":
            ok &= flat >= 0
        ok &= flat < n_words
        sel = np.flatnonzero(ok)
        small = np.uint16 if n_words <= 2 ** 16 else np.uint32
        flat = flat[sel].astype(small)
        order = np.argsort(flat, kind="stable")               # radix sort; stable: images stay in order
        postings = ids[sel[order] // per]
        counts = np.bincount(flat, minlength=n_words)
        offsets = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        inv = cls(offsets, postings, m)
        return inv

    def lists(self, query_words: np.ndarray) -> list[np.ndarray]:
        qw = np.unique(np.asarray(query_words, dtype=np.int64))
        qw = qw[(qw >= 0) & (qw < self.n_words)]
        return [self.postings[self.offsets[w]:self.offsets[w + 1]] for w in qw]

    def mask(self, query_words: np.ndarray) -> np.ndarray:
        """(n_images,) bool: the images that share at least one word with the query."""
        m = np.zeros(self.n_images, dtype=bool)
        ls = self.lists(query_words)
        if ls:
            m[np.concatenate(ls)] = True
        return m

    def candidates(self, query_words: np.ndarray) -> np.ndarray:
        """Sorted image ids that share at least one word with the query."""
        return np.flatnonzero(self.mask(query_words))

    def votes(self, query_words: np.ndarray) -> np.ndarray:
        """(n_images,) number of query words each image shares."""
        ls = self.lists(query_words)
        if not ls:
            return np.zeros(self.n_images, np.int64)
        return np.bincount(np.concatenate(ls), minlength=self.n_images)

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.postings.nbytes)

    # ---- cache files ----
    def save(self, directory: str | os.PathLike, state: dict) -> None:
        from glimr.io.atomic import atomic_write_bytes, atomic_write_npy  # noqa: PLC0415

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_npy(d / "ivf_offsets.npy", self.offsets)
        atomic_write_npy(d / "ivf_postings.npy", self.postings)
        atomic_write_bytes(d / "ivf.json", json.dumps({**state, "n_images": self.n_images,
                                                  "n_postings": int(len(self.postings))}).encode())

    @classmethod
    def load(cls, directory: str | os.PathLike, state: dict) -> InvertedFile | None:
        """The cached inverted file if its state matches ``state`` (else None: rebuild it)."""
        d = Path(directory)
        try:
            doc = json.loads((d / "ivf.json").read_text())
            if any(doc.get(k) != v for k, v in state.items()):
                return None
            inv = cls(np.load(d / "ivf_offsets.npy", allow_pickle=False),
                      np.load(d / "ivf_postings.npy", allow_pickle=False), doc["n_images"])
            if len(inv.postings) != doc["n_postings"] or inv.offsets[-1] != len(inv.postings):
                return None
            return inv
        except (OSError, ValueError, KeyError):
            return None
