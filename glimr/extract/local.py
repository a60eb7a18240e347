"""Local features for query-sensitive co-attention (Hu & Bors, Neural Networks 2023, sections 4 and 5).

Per image, from the last convolutional tensor ``RetrievalOutput.local`` of every scale (the same forward pass
that gives the global descriptor, see ``extract(local_fn=...)``):

1. selection (sec. 4.2): the ``N`` local features with the largest L2 norm, all scales together;
2. clustering (sec. 4.2): k-means over them, initialised by the paper's deterministic farthest-point seeding
   (steps 1-4: the largest-norm feature first, then repeatedly the feature farthest from the chosen centres);
3. per cluster GeM (the model's ``p``) and the model's whitening FC (if its head has one; identity otherwise);
4. PCA to ``D'`` (sec. 5.1, eqs. (11)-(13)) learned from sample images, then L2 per cluster.

The query side (sec. 4.2): ``V_q`` = whitening(GeM(selected query features)) -> PCA -> L2.
The inverted file side (sec. 5.2): the selected features -> a second PCA (``m_cdb``, ``P_cdb``) -> the nearest
visual word of a k-means codebook; an image's words are the distinct words of its features.

What an index stores per image (:class:`RecordCodec`): ``K x D'`` unit cluster vectors (float32, float16 or
int8 with a per-dimension scale), their norms, their Gram matrix (off-diagonal, float16), a small "proxy"
vector (the clusters pooled with uniform weights, i.e. co-attention at temperature 0, first ``proxy_dim``
PCA dimensions, int8 with a per-image scale, used to pre-select candidates at scale) and the visual words. Parameters are saved as
``.npy`` + ``.json`` (never pickle): :meth:`CoAttentionParams.save` / :meth:`CoAttentionParams.load`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from glimr.io.atomic import atomic_write_bytes, atomic_write_npy

__all__ = [
    "PAPER_SCALES",
    "DEFAULT_FIT_DIR",
    "FIT_IMAGES_ENV",
    "resolve_fit_images",
    "LocalConfig",
    "ImageLocal",
    "LocalAccumulator",
    "model_pooling",
    "select_top_n",
    "farthest_point_seeds",
    "kmeans_fps",
    "cluster_gem",
    "gem_np",
    "PCA",
    "Codebook",
    "RecordCodec",
    "CoAttentionParams",
    "extract_local",
    "fit_params",
]

#: the paper's 5 scales {1/(2 sqrt 2), 1/2, 1/sqrt 2, 1, sqrt 2} (sec. 6.1), relative to the longest side.
PAPER_SCALES: tuple[float, ...] = (1 / (2 * math.sqrt(2)), 0.5, 1 / math.sqrt(2), 1.0, math.sqrt(2))  # = "paper5"
#: storage types of the cluster features (float32: the paper's 20 KB per image at K=10, D'=512)
DTYPES = ("float32", "float16", "int8")


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class LocalConfig:
    """Everything that decides the co-attention features of an image (defaults: the paper, sec. 6.1)."""

    n_select: int = 500          # N: local features kept per image (largest L2 norm, all scales)
    clusters: int = 10           # K: k-means clusters per image
    dim: int = 512               # D': PCA dimension of the query vector and the cluster features
    kmeans_iters: int = 20       # Lloyd iterations after the farthest-point seeding
    p: float | None = None       # GeM power; None = the model head's p (3 if it has none)
    pca_whiten: bool = False     # divide the PCA projections by sqrt(eigenvalue) (not in the paper)
    dtype: str = "float32"       # stored cluster features: float32 (paper), float16, int8
    proxy_dim: int = 64          # dimensions of the uniform-pooling proxy used to pre-select at scale
    ivf_features: int = 300      # N_cdb: features per image assigned to visual words (paper: 300 for training)
    codebook_size: int = 4096    # K_cdb: visual words (paper: 65536; a CPU-friendly default)
    codebook_dim: int = 128      # D_cdb: PCA dimension for the codebook (paper: 128)
    max_words: int = 128         # distinct words stored per image (the most frequent first); 0 = no IVF

    def __post_init__(self):
        if self.n_select < 1 or self.clusters < 1 or self.dim < 1:
            raise ValueError(f"co-attention needs N, K, D' >= 1 (got {self.n_select}, {self.clusters}, {self.dim})")
        if self.dtype not in DTYPES:
            raise ValueError(f"co-attention dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.proxy_dim < 1 or self.proxy_dim > self.dim:
            raise ValueError(f"proxy_dim must be in 1..{self.dim} (got {self.proxy_dim})")

    @classmethod
    def compact(cls, **kw) -> LocalConfig:
        """The storage-bounded preset (< 4 KB per image with its inverted file): D'=256, int8 (and the rest)."""
        return cls(**{"dim": 256, "dtype": "int8", **kw})

    @classmethod
    def paper(cls, **kw) -> LocalConfig:
        """The paper's configuration (sec. 5-6.1): N = 500, K = 10, D' = 512 float32, and the inverted file with
        K_cdb = 65,536 words, D_cdb = 128, every one of the N selected features assigned to a word (so up to
        500 distinct words stored per image)."""
        return cls(**{"n_select": 500, "clusters": 10, "dim": 512, "dtype": "float32", "codebook_size": 65536,
                      "codebook_dim": 128, "ivf_features": 500, "max_words": 500, **kw})

    @classmethod
    def named(cls, name: str, **kw) -> LocalConfig:
        """``"paper"`` (:meth:`paper`), ``"compact"`` (:meth:`compact`: D' = 256 int8, K_cdb = 4096, 128 words
        per image) or ``"default"`` (the class defaults); ``kw`` overrides single values."""
        presets = {"paper": cls.paper, "compact": cls.compact, "default": cls}
        if name not in presets:
            raise ValueError(f"co-attention configuration {name!r}: use one of {', '.join(presets)}")
        if "dim" in kw and "proxy_dim" not in kw:
            kw["proxy_dim"] = min(cls.proxy_dim, int(kw["dim"]))
        return presets[name](**kw)

    def capped(self, channels: int) -> LocalConfig:
        """These settings for local features of ``channels`` dimensions: D', D_cdb and the proxy's dimension
        capped at ``channels`` (a PCA cannot add dimensions; e.g. a head that hands co-attention Lite2's
        120-channel res4 map, where the paper's D' = 512 assumes ResNet's 2048)."""
        dim = min(self.dim, int(channels))
        return replace(self, dim=dim, codebook_dim=min(self.codebook_dim, int(channels)),
                       proxy_dim=min(self.proxy_dim, dim))

    def to_json(self) -> dict:
        return asdict(self)

    def codec(self, scale: np.ndarray | None = None) -> RecordCodec:
        """The record layout these settings give (``scale``: the int8 steps, needed to encode/decode)."""
        return RecordCodec(self.clusters, self.dim, self.dtype, self.proxy_dim, self.max_words, self.codebook_size,
                           scale)

    @classmethod
    def from_json(cls, d: dict) -> LocalConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ------------------------------------------------------------------------------------------ model side
def model_pooling(model: torch.nn.Module) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """(GeM p, whitening weight (out, in) or None, bias or None) of a GeM-style head.

    Co-attention re-weights the tensor a GeM model pools (sec. 3.2); for other heads p = 3 and no FC."""
    head = getattr(model, "head", None)
    pool = getattr(head, "pool", None)
    p = getattr(pool, "p", 3.0)
    p = float(p.detach().item()) if isinstance(p, torch.Tensor) else float(p)
    fc = getattr(head, "whiten", None)
    if isinstance(fc, torch.nn.Linear):
        w = fc.weight.detach().float().cpu().numpy()
        b = fc.bias.detach().float().cpu().numpy() if fc.bias is not None else np.zeros(w.shape[0], np.float32)
        return p, w, b
    return p, None, None


def gem_np(x: np.ndarray, p: float, eps: float = 1e-6, axis: int = 0) -> np.ndarray:
    """GeM (eq. (1)) of non-negative features along ``axis`` (clamped at eps, as glimr.models.pooling.gem)."""
    x = np.asarray(x, dtype=np.float64)
    return np.power(np.mean(np.power(np.maximum(x, eps), p), axis=axis), 1.0 / p).astype(np.float32)


def select_top_n(maps: Sequence[torch.Tensor | np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sec. 4.2 selection: the ``n`` local features with the largest L2 norm over all maps (C, h, w).

    Returns (features (n', C) float32 in descending norm order, positions (n', 3) = (map index, row, col));
    n' = min(n, number of locations). Ties keep map, row, col order."""
    feats, pos = [], []
    for si, m in enumerate(maps):
        m = torch.as_tensor(m).float()
        c, h, w = m.shape
        f = m.reshape(c, h * w).T
        feats.append(f)
        yy, xx = np.divmod(np.arange(h * w), w)
        pos.append(np.stack([np.full(h * w, si), yy, xx], axis=1))
    f = torch.cat(feats)
    norms = f.pow(2).sum(1)
    order = torch.sort(norms, descending=True, stable=True).indices[:n].numpy()
    return f[order].numpy().astype(np.float32, copy=False), np.concatenate(pos)[order].astype(np.int32)


def farthest_point_seeds(x: np.ndarray, k: int) -> np.ndarray:
    """The paper's deterministic k-means++ variant (sec. 4.2, steps 1-4); returns the seed row indices.

    Step 1: the first centre is the feature with the largest squared norm. Step 2: every feature's smallest
    distance to the chosen centres. Step 3: the feature with the largest such distance is the next centre.
    Step 4: repeat until ``k`` centres. Ties go to the lowest index; if fewer than ``k`` distinct features
    exist the seeding stops early (every remaining feature already coincides with a centre)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    first = int(np.argmax(np.einsum("nd,nd->n", x, x)))          # step 1
    seeds = [first]
    d = np.einsum("nd,nd->n", x - x[first], x - x[first])       # step 2 (squared: same argmax)
    while len(seeds) < min(k, len(x)):
        m = int(np.argmax(d))                                    # step 3
        if d[m] <= 0.0:
            break
        seeds.append(m)
        diff = x - x[m]
        d = np.minimum(d, np.einsum("nd,nd->n", diff, diff))    # step 2 again, with the new centre
    return np.asarray(seeds, dtype=np.int64)


def kmeans_fps(x: np.ndarray, k: int, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """k-means (FAISS, Lloyd) from the farthest-point seeds: (labels (n,), centres (k', C)), k' <= k.

    Deterministic: same input, same output (fixed seeds, fixed FAISS seed for empty-cluster splitting)."""
    import faiss  # noqa: PLC0415

    x = np.ascontiguousarray(x, dtype=np.float32)
    seeds = farthest_point_seeds(x, k)
    k2 = len(seeds)
    if k2 <= 1 or iters <= 0:
        centres = x[seeds].copy()
        if k2 <= 1:
            return np.zeros(len(x), dtype=np.int64), centres
    else:
        km = faiss.Kmeans(x.shape[1], k2, niter=int(iters), seed=1234, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=10 ** 9)
        km.train(x, init_centroids=x[seeds].copy())
        centres = km.centroids.copy()
    # final assignment (squared L2; ties -> lowest centre)
    d = (x * x).sum(1, keepdims=True) - 2.0 * x @ centres.T + (centres * centres).sum(1)[None]
    return np.argmin(d, axis=1).astype(np.int64), centres


def cluster_gem(x: np.ndarray, labels: np.ndarray, k: int, p: float, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster GeM of the member features: ((k, C) pooled, (k,) member counts); empty clusters are 0."""
    xp = np.power(np.maximum(np.asarray(x, dtype=np.float64), eps), p)
    onehot = np.zeros((k, len(x)))
    onehot[labels, np.arange(len(x))] = 1.0
    counts = onehot.sum(1)
    sums = onehot @ xp
    mean = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
    out = np.power(mean, 1.0 / p)
    out[counts == 0] = 0.0
    return out.astype(np.float32), counts.astype(np.int64)


@dataclass
class ImageLocal:
    """One image's co-attention features in the model's space (before PCA).

    query:    (C,) whitened GeM of the selected features: the image as a query (V_q before PCA);
    global_:  (C,) whitened GeM over all locations of all scales (the PCA sample vector, sec. 6.1);
    clusters: (K', C) whitened per cluster GeM (X_{c,K} before PCA), K' <= K;
    counts:   (K',) features per cluster;
    feats:    (n, C) the selected features, descending L2 norm (kept for the codebook / word assignment);
    labels:   (n,) cluster of each selected feature; pos: (n, 3) (scale index, row, col);
    grids:    per scale (h, w) of the feature map and (H, W) of the input view (to draw maps).
    """

    query: np.ndarray
    global_: np.ndarray
    clusters: np.ndarray
    counts: np.ndarray
    feats: np.ndarray | None
    labels: np.ndarray
    pos: np.ndarray
    grids: list[tuple[int, int, int, int]] = field(default_factory=list)


def _whiten(v: np.ndarray, w: np.ndarray | None, b: np.ndarray | None) -> np.ndarray:
    return v if w is None else (v @ w.T + b).astype(np.float32)


def image_local(maps: Sequence[torch.Tensor | np.ndarray], cfg: LocalConfig, p: float,
                w: np.ndarray | None = None, b: np.ndarray | None = None, keep_feats: bool = True,
                view_sizes: Sequence[tuple[int, int]] | None = None) -> ImageLocal:
    """Selection, clustering, per cluster GeM and whitening for one image's per-scale maps (C, h, w)."""
    feats, pos = select_top_n(maps, cfg.n_select)
    labels, _ = kmeans_fps(feats, cfg.clusters, cfg.kmeans_iters)
    k = int(labels.max()) + 1 if len(labels) else 0
    clusters, counts = cluster_gem(feats, labels, k, p)
    # global GeM over every location of every scale (for the PCA samples)
    num, den = 0.0, 0
    for m in maps:
        m = torch.as_tensor(m).float()
        num = num + m.clamp(min=1e-6).pow(p).sum(dim=(1, 2)).double().numpy()
        den += m.shape[1] * m.shape[2]
    g = np.power(num / max(den, 1), 1.0 / p).astype(np.float32)
    grids = []
    for si, m in enumerate(maps):
        hh, ww = int(m.shape[1]), int(m.shape[2])
        vh, vw = view_sizes[si] if view_sizes is not None else (hh, ww)
        grids.append((hh, ww, int(vh), int(vw)))
    return ImageLocal(query=_whiten(gem_np(feats, p), w, b), global_=_whiten(g, w, b),
                      clusters=_whiten(clusters, w, b), counts=counts, feats=feats if keep_feats else None,
                      labels=labels, pos=pos, grids=grids)


class LocalAccumulator:
    """The ``local_fn`` of :func:`glimr.extract.multiscale.extract`: collects an image's per-scale maps and,
    once all scales are in, turns them into an :class:`ImageLocal` (``self.results[item index]``).

    Per scale only the ``N`` largest-norm locations are kept while waiting (the N largest over all scales are
    among them), so memory stays at N x C per scale and image."""

    def __init__(self, n_scales: int, cfg: LocalConfig, model: torch.nn.Module, keep_feats: bool = True,
                 on_done=None):
        self.n_scales, self.cfg, self.keep_feats = int(n_scales), cfg, keep_feats
        p, self.w, self.b = model_pooling(model)
        self.p = float(cfg.p) if cfg.p is not None else p
        self.pending: dict[int, dict[int, tuple]] = {}
        self.results: dict[int, ImageLocal] = {}
        self.on_done = on_done

    def __call__(self, i: int, si: int, local: torch.Tensor, view_hw: tuple[int, int]) -> None:
        c, h, w = local.shape
        # full-map GeM numerator of this scale (for the global PCA sample vector)
        gsum = local.clamp(min=1e-6).pow(self.p).sum(dim=(1, 2)).double().numpy()
        f = local.reshape(c, h * w).T
        norms = f.pow(2).sum(1)
        keep = torch.sort(norms, descending=True, stable=True).indices[:self.cfg.n_select]
        self.pending.setdefault(i, {})[si] = (f[keep].clone(), keep.numpy(), (h, w), view_hw, gsum)
        if len(self.pending[i]) == self.n_scales:
            self._finish(i)

    def _finish(self, i: int) -> None:
        parts = self.pending.pop(i)
        feats, pos, grids = [], [], []
        num, den = 0.0, 0
        for si in range(self.n_scales):
            f, keep, (h, w), (vh, vw), gsum = parts[si]
            feats.append(f)
            yy, xx = np.divmod(keep, w)
            pos.append(np.stack([np.full(len(keep), si), yy, xx], axis=1))
            grids.append((h, w, vh, vw))
            num, den = num + gsum, den + h * w
        f = torch.cat(feats)
        order = torch.sort(f.pow(2).sum(1), descending=True, stable=True).indices[:self.cfg.n_select].numpy()
        sel = f[order].numpy().astype(np.float32)
        pos_sel = np.concatenate(pos)[order].astype(np.int32)
        labels, _ = kmeans_fps(sel, self.cfg.clusters, self.cfg.kmeans_iters)
        k = int(labels.max()) + 1 if len(labels) else 0
        clusters, counts = cluster_gem(sel, labels, k, self.p)
        g = np.power(num / max(den, 1), 1.0 / self.p).astype(np.float32)
        res = ImageLocal(query=_whiten(gem_np(sel, self.p), self.w, self.b), global_=_whiten(g, self.w, self.b),
                         clusters=_whiten(clusters, self.w, self.b), counts=counts,
                         feats=sel if self.keep_feats else None, labels=labels, pos=pos_sel, grids=grids)
        if self.on_done is not None:
            self.on_done(i, res)
        else:
            self.results[i] = res


def extract_local(model: torch.nn.Module, items: Sequence, *, cfg: LocalConfig | None = None,
                  scales: Sequence[float] = PAPER_SCALES, max_size: int = 512, boxes=None, batch_size: int = 16,
                  workers: int | None = None, precision: str = "auto", progress: bool = True, desc: str = "local features",
                  keep_feats: bool = True, on_done=None, settings=None, **kw):
    """Global descriptors and co-attention features from one forward pass per view.

    ``settings`` (glimr.extract.multiscale.ExtractSettings) replaces scales, max_size, batch_size, workers,
    precision and max_pixels when given.
    Returns (ExtractResult, {item index: ImageLocal}) (failed images are in ``ExtractResult.errors`` and
    have no entry); with ``on_done(i, ImageLocal)`` results are handed over instead of kept."""
    from glimr.extract.multiscale import ExtractSettings, extract, parse_scales  # noqa: PLC0415

    cfg = cfg or LocalConfig()
    if settings is None:
        settings = ExtractSettings(model=getattr(model, "name", None) or "model",
                                   scales=parse_scales(scales) if isinstance(scales, str) else tuple(scales),
                                   max_size=max_size, batch_size=batch_size, workers=workers, precision=precision,
                                   **({"max_pixels": kw.pop("max_pixels")} if "max_pixels" in kw else {}))
    acc = LocalAccumulator(len(settings.scales), cfg, model, keep_feats=keep_feats, on_done=on_done)
    res = extract(model, items, settings=settings, boxes=boxes, progress=progress, desc=desc, local_fn=acc, **kw)
    return res, acc.results


# ------------------------------------------------------------------------------------------ PCA (sec. 5.1)
@dataclass
class PCA:
    """Eqs. (11)-(13): ``Y' = (Y - m) P^T`` with P the top ``dim`` eigenvectors of the sample covariance;
    with ``whiten`` the projections are also divided by sqrt(eigenvalue) (PCA whitening; not in the paper)."""

    mean: np.ndarray          # (D,)
    components: np.ndarray    # (dim, D)
    eigvals: np.ndarray       # (dim,)
    whiten: bool = False

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, whiten: bool = False) -> PCA:
        x = np.asarray(x, dtype=np.float64)
        n, d = x.shape
        if dim > min(d, n - 1):
            raise ValueError(f"PCA to {dim} dimensions needs more than {dim} samples of dimension >= {dim} "
                             f"(got {n} samples of dimension {d}): use more sample images or a smaller dim")
        m = x.mean(0)                                           # eq. (11)
        xc = x - m
        if n <= d:   # the eigenvectors of eq. (12)'s covariance from the SVD of the centred samples (n^2 d)
            _, sv, vt = np.linalg.svd(xc, full_matrices=False)
            vals, vecs = (sv[:dim] ** 2) / n, vt[:dim]
        else:
            from scipy.linalg import eigh  # noqa: PLC0415

            cov = xc.T @ xc / n                                 # eq. (12)
            vals, vecs = eigh(cov, subset_by_index=[d - dim, d - 1])
            order = np.argsort(vals)[::-1]
            vals, vecs = vals[order], vecs[:, order].T
        sign = np.sign(vecs[np.arange(dim), np.argmax(np.abs(vecs), axis=1)])  # deterministic signs
        vecs = vecs * sign[:, None]
        return cls(m.astype(np.float32), vecs.astype(np.float32), np.maximum(vals, 0).astype(np.float32), whiten)

    def apply(self, y: np.ndarray) -> np.ndarray:
        out = (np.asarray(y, np.float32) - self.mean) @ self.components.T   # eq. (13)
        if self.whiten:
            out = out / np.sqrt(self.eigvals + 1e-9 * max(float(self.eigvals[0]), 1e-12))
        return out.astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])


def l2n_np(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x, dtype=np.float32), where=n > 0).astype(np.float32)


# ------------------------------------------------------------------------------------------ codebook (sec. 5.2)
@dataclass
class Codebook:
    """Visual words: a PCA (``m_cdb``, ``P_cdb``) of local features, then k-means words (FAISS)."""

    pca: PCA
    words: np.ndarray          # (K_cdb, D_cdb)

    @classmethod
    def fit(cls, feats: np.ndarray, size: int, dim: int = 128, iters: int = 10, seed: int = 1234,
            points_per_word: int = 32, pca_rows: int = 50000) -> Codebook:
        """PCA (on at most ``pca_rows`` features) then FAISS k-means (at most ``points_per_word`` x ``size``
        features, FAISS's own seeded sub-sampling): deterministic."""
        import faiss  # noqa: PLC0415

        feats = np.asarray(feats, np.float32)
        rows = np.linspace(0, len(feats) - 1, min(len(feats), pca_rows)).astype(np.int64)
        pca = PCA.fit(feats[rows], min(dim, feats.shape[1], len(rows) - 1))
        z = pca.apply(feats)
        size = int(min(size, len(z)))
        km = faiss.Kmeans(z.shape[1], size, niter=iters, seed=seed, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=points_per_word)
        km.train(np.ascontiguousarray(z))
        return cls(pca, km.centroids.astype(np.float32).copy())

    @property
    def size(self) -> int:
        return int(len(self.words))

    def _index(self):
        if getattr(self, "_faiss", None) is None:
            import faiss  # noqa: PLC0415

            self._faiss = faiss.IndexFlatL2(self.words.shape[1])
            self._faiss.add(np.ascontiguousarray(self.words))
        return self._faiss

    def assign(self, feats: np.ndarray) -> np.ndarray:
        """Nearest word of every feature (n,)."""
        if len(feats) == 0:
            return np.zeros(0, np.int64)
        _, ids = self._index().search(np.ascontiguousarray(self.pca.apply(feats)), 1)
        return ids[:, 0].astype(np.int64)

    def image_words(self, feats: np.ndarray, max_words: int) -> np.ndarray:
        """An image's distinct words (sorted), at most ``max_words``: the most frequent first, then by id."""
        w = self.assign(feats)
        uniq, cnt = np.unique(w, return_counts=True)
        if len(uniq) > max_words:
            keep = np.lexsort((uniq, -cnt))[:max_words]
            uniq = np.sort(uniq[keep])
        return uniq.astype(np.int64)


# ------------------------------------------------------------------------------------------ records
class RecordCodec:
    """Fixed-size per-image record of the co-attention features (a numpy structured dtype).

    fields: ``codes`` (K, D') unit cluster vectors (float32 / float16 / int8 with per-dimension ``scale``),
    ``norms`` (K,) float16 (0 = empty slot), ``gram`` (K(K-1)/2,) float16 off-diagonal Gram of the unit
    vectors, ``proxy`` (proxy_dim,) int8 times ``proxy_scale`` (float16) and ``words`` (max_words,) uint16 (codebooks
    of at most 65535 words) or uint32, padded with the type's maximum."""

    DTYPES = DTYPES

    def __init__(self, clusters: int, dim: int, dtype: str, proxy_dim: int, max_words: int, codebook_size: int,
                 scale: np.ndarray | None = None):
        self.k, self.dim, self.dtype, self.proxy_dim = int(clusters), int(dim), dtype, int(proxy_dim)
        self.max_words = int(max_words)
        self.word_dtype = np.uint16 if codebook_size < 2 ** 16 else np.uint32   # the max value is the padding
        self.pad_word = np.iinfo(self.word_dtype).max
        self.scale = None if scale is None else np.asarray(scale, np.float32)
        fields = [("codes", {"float32": "<f4", "float16": "<f2", "int8": "i1"}[dtype], (self.k, self.dim)),
                  ("norms", "<f2", (self.k,)), ("gram", "<f2", (self.k * (self.k - 1) // 2,)),
                  ("proxy", "i1", (self.proxy_dim,)), ("proxy_scale", "<f2")]
        if self.max_words:
            fields.append(("words", np.dtype(self.word_dtype).newbyteorder("<").str, (self.max_words,)))
        self.record = np.dtype(fields)
        self.iu = np.triu_indices(self.k, 1)

    @property
    def nbytes(self) -> int:
        return int(self.record.itemsize)

    def encode(self, units: np.ndarray, norms: np.ndarray, proxy: np.ndarray, words: np.ndarray | None) -> np.ndarray:
        """One record from (K', D') unit vectors, (K',) norms, (proxy_dim,) proxy and the word ids."""
        r = np.zeros((), dtype=self.record)
        k = min(len(units), self.k)
        u = np.zeros((self.k, self.dim), np.float32)
        u[:k] = units[:k]
        if self.dtype == "int8":
            self._need_scale()
            r["codes"] = np.clip(np.rint(u / self.scale), -127, 127).astype(np.int8)
        else:
            r["codes"] = u
        n = np.zeros(self.k, np.float32)
        n[:k] = norms[:k]
        r["norms"] = n
        r["gram"] = (u @ u.T)[self.iu]
        pmax = float(np.max(np.abs(proxy))) if len(proxy) else 0.0
        ps = pmax / 127.0 if pmax > 0 else 1.0
        r["proxy"] = np.clip(np.rint(np.asarray(proxy, np.float32) / ps), -127, 127).astype(np.int8)
        r["proxy_scale"] = ps
        if self.max_words:
            w = np.full(self.max_words, self.pad_word, dtype=np.int64)
            if words is not None and len(words):
                w[:min(len(words), self.max_words)] = np.asarray(words)[:self.max_words]
            r["words"] = w
        return r

    def decode_units(self, codes: np.ndarray) -> np.ndarray:
        """(..., K, D') float32 unit vectors (int8: times the per-dimension scale)."""
        if self.dtype == "int8":
            self._need_scale()
            return codes.astype(np.float32) * self.scale
        return codes.astype(np.float32)

    def _need_scale(self) -> None:
        if self.scale is None:
            raise ValueError("int8 co-attention records need their per-dimension scales (CoAttentionParams)")

    def to_json(self) -> dict:
        return {"clusters": self.k, "dim": self.dim, "dtype": self.dtype, "proxy_dim": self.proxy_dim,
                "max_words": self.max_words, "record_bytes": self.nbytes}


# ------------------------------------------------------------------------------------------ parameters
@dataclass
class CoAttentionParams:
    """What turns :class:`ImageLocal` into stored records and query vectors: the config, the PCA of sec. 5.1,
    the int8 scales, and the codebook of sec. 5.2 (None when ``max_words`` is 0)."""

    cfg: LocalConfig
    pca: PCA
    scale: np.ndarray | None = None     # (D',) int8 step per dimension
    codebook: Codebook | None = None
    meta: dict = field(default_factory=dict)

    @property
    def codec(self) -> RecordCodec:
        return self.cfg.codec(self.scale)

    # ---- the vectors of the paper ----
    def query_vector(self, loc: ImageLocal) -> np.ndarray:
        """V_q: whitened GeM of the selected query features -> PCA -> L2 (D',)."""
        return l2n_np(self.pca.apply(loc.query[None]))[0]

    def cluster_vectors(self, loc: ImageLocal) -> tuple[np.ndarray, np.ndarray]:
        """X_{c,K}: whitened per cluster GeM -> PCA; returned as (K', D') unit vectors and (K',) norms."""
        z = self.pca.apply(loc.clusters)
        z[np.asarray(loc.counts) == 0] = 0.0          # an empty cluster is an empty slot
        n = np.linalg.norm(z, axis=1)
        return l2n_np(z), n.astype(np.float32)

    def proxy(self, units: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """Co-attention at temperature 0 (uniform weights, eq. (9)), first proxy_dim PCA dims, L2."""
        v = (units * self._pool_norms(norms)[:, None]).sum(0)[:self.cfg.proxy_dim]
        return l2n_np(v)

    @staticmethod
    def _pool_norms(norms: np.ndarray) -> np.ndarray:
        return (norms > 0).astype(np.float32)

    def encode(self, loc: ImageLocal) -> np.ndarray:
        units, norms = self.cluster_vectors(loc)
        words = None
        if self.codebook is not None and self.cfg.max_words and loc.feats is not None:
            words = self.codebook.image_words(loc.feats[:self.cfg.ivf_features], self.cfg.max_words)
        return self.codec.encode(units, norms, self.proxy(units, norms), words)

    def query_words(self, loc: ImageLocal) -> np.ndarray:
        """The query's distinct visual words (all of them: the query side is not capped)."""
        if self.codebook is None or loc.feats is None:
            return np.zeros(0, np.int64)
        return np.unique(self.codebook.assign(loc.feats[:self.cfg.ivf_features]))

    # ---- persistence: .npy + .json, atomic per file, the JSON (written last) names what belongs ----
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"pca_mean": self.pca.mean, "pca_components": self.pca.components, "pca_eigvals": self.pca.eigvals}
        if self.scale is not None:
            arrays["scale"] = self.scale
        if self.codebook is not None:
            arrays.update({"cdb_mean": self.codebook.pca.mean, "cdb_components": self.codebook.pca.components,
                           "cdb_eigvals": self.codebook.pca.eigvals, "cdb_words": self.codebook.words})
        for name, a in arrays.items():
            atomic_write_npy(d / f"{name}.npy", np.ascontiguousarray(a, dtype=np.float32))
        doc = {"format": 1, "config": self.cfg.to_json(), "pca_whiten": self.pca.whiten,
               "arrays": sorted(arrays), "codec": self.codec.to_json(), "meta": self.meta}
        atomic_write_bytes(d / "params.json", json.dumps(doc, indent=2).encode())
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CoAttentionParams:
        d = Path(directory)
        p = d / "params.json"
        if not p.is_file():
            raise FileNotFoundError(f"'{d}' holds no co-attention parameters (params.json); build the index with "
                                    "--coattention, or fit them with glimr.extract.local.fit_params")
        doc = json.loads(p.read_text())
        a = {name: np.load(d / f"{name}.npy", allow_pickle=False) for name in doc["arrays"]}
        cfg = LocalConfig.from_json(doc["config"])
        pca = PCA(a["pca_mean"], a["pca_components"], a["pca_eigvals"], bool(doc.get("pca_whiten", False)))
        cb = None
        if "cdb_words" in a:
            cb = Codebook(PCA(a["cdb_mean"], a["cdb_components"], a["cdb_eigvals"]), a["cdb_words"])
        return cls(cfg, pca, a.get("scale"), cb, doc.get("meta", {}))


def fit_params(samples: Sequence[ImageLocal], cfg: LocalConfig, *, meta: dict | None = None) -> CoAttentionParams:
    """Learn the PCA (sec. 5.1: from the whitened global GeM vectors of sample images, no L2), the int8 scales
    (from the samples' cluster vectors) and, when ``cfg.max_words`` > 0, the codebook (sec. 5.2: PCA of the
    samples' selected features to D_cdb, k-means to K_cdb words). ``samples``: ImageLocal of sample images
    (not the benchmark's queries). With D' or fewer sample images the samples' cluster vectors join the PCA
    sample (the PCA needs more than D' vectors)."""
    if not samples:
        raise ValueError("co-attention parameters need sample images")
    g = np.stack([s.global_ for s in samples])
    if cfg.capped(g.shape[1]) != cfg:
        meta = dict(meta or {}, capped=f"D' {cfg.dim} -> {min(cfg.dim, g.shape[1])} (local features of "
                                       f"{g.shape[1]} dimensions)")
        cfg = cfg.capped(g.shape[1])
    pca_from = "global"
    if len(g) <= cfg.dim:
        g = np.concatenate([g] + [s.clusters for s in samples])
        pca_from = "global+clusters"
        if len(g) <= cfg.dim:
            raise ValueError(f"co-attention's PCA to D'={cfg.dim} needs more than {cfg.dim} sample vectors, and "
                             f"{len(samples)} sample images give {len(g)} (1 + K each): use more sample images "
                             f"(--ca-samples) or a smaller D' (--ca-dim {max(1, len(g) - 1)} or less)")
    pca = PCA.fit(g, cfg.dim, whiten=cfg.pca_whiten)
    scale = None
    if cfg.dtype == "int8":
        units = l2n_np(pca.apply(np.concatenate([s.clusters for s in samples])))
        scale = (np.maximum(np.abs(units).max(0), 1e-6) / 127.0).astype(np.float32)
    cb = None
    if cfg.max_words > 0:
        have = [s.feats[:cfg.ivf_features] for s in samples if s.feats is not None]
        if not have:
            raise ValueError("the codebook needs the samples' selected features (keep_feats=True)")
        # k-means sees at most 32 features per word: take that many, spread evenly over each image's N_cdb
        per = max(1, min(cfg.ivf_features, math.ceil(32 * cfg.codebook_size / len(have))))
        feats = [f[np.unique(np.linspace(0, len(f) - 1, min(per, len(f))).astype(np.int64))] for f in have]
        cb = Codebook.fit(np.concatenate(feats), cfg.codebook_size, cfg.codebook_dim)
    return CoAttentionParams(cfg, pca, scale, cb, dict(meta or {}, n_samples=len(samples), pca_from=pca_from))


#: where co-attention's PCA and codebook are learned when nothing is given: this environment variable, else
#: DEFAULT_FIT_DIR (relative to the working folder: the project's training photos, next to a checkout)
FIT_IMAGES_ENV = "GLIMR_FIT_IMAGES"
DEFAULT_FIT_DIR = Path("..") / "shared" / "data" / "photos"


def resolve_fit_images(fit, database: Sequence) -> tuple[list, str]:
    """The images co-attention learns its PCA and codebook from, and a line that says which they are.

    The paper learns them on training images (PCA on 50k, codebook on 60k, sec. 6.1), never on the database it
    ranks: fitting on the evaluated images is a transductive advantage. ``fit``: a folder (or a list of image
    paths); ``"database"`` (the ranked images themselves: transductive, said so); None = the folder named by
    $GLIMR_FIT_IMAGES, else ``../shared/data/photos`` when it exists, else an error that says what to pass."""
    from glimr.io.images import list_images  # noqa: PLC0415

    if fit is None:
        env = os.environ.get(FIT_IMAGES_ENV)
        if env:
            fit = env
        elif DEFAULT_FIT_DIR.is_dir():
            fit = DEFAULT_FIT_DIR
        else:
            raise ValueError(
                "co-attention learns its PCA and codebook from a separate collection of images, never from the "
                "images it ranks: pass a folder of photos unrelated to the searched ones (--ca-samples DIR for an "
                f"index, fit=DIR for the eval re-ranker) or set {FIT_IMAGES_ENV}=DIR; 'database' fits on the "
                "database itself (transductive: it inflates results)")
    if isinstance(fit, str) and fit == "database":
        items = list(database)
        return items, f"the database itself ({len(items)} images; transductive: fitted on the ranked images)"
    if isinstance(fit, (str, os.PathLike)):
        d = Path(fit)
        if not d.is_dir():
            raise ValueError(f"co-attention fit images: '{d}' is not a folder; give a folder of photos "
                             "unrelated to the searched ones, or 'database'")
        items = list_images(d)
        if not items:
            raise ValueError(f"co-attention fit images: no images under '{d}'")
        label = f"{d} ({len(items)} images)"
    else:
        items = list(fit)
        label = f"{len(items)} given images"
    db = {os.path.realpath(p) for p in database if isinstance(p, (str, os.PathLike))}
    shared = sum(os.path.realpath(p) in db for p in items if isinstance(p, (str, os.PathLike)))
    if shared:
        label += f"; {shared} of them are also in the database (partly transductive)"
    return items, label


def sample_items(items: Sequence, n: int) -> list:
    """Up to ``n`` items spread evenly over the list (deterministic)."""
    items = list(items)
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[math.floor(i * step)] for i in range(n)]


# ------------------------------------------------------------------------------------------ caching
def save_locals(directory: str | os.PathLike, locs: Sequence[ImageLocal | None]) -> Path:
    """Many images' :class:`ImageLocal` as stacked ``.npy`` arrays (None = a failed image), for caches."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ok = [x for x in locs if x is not None]
    n = len(locs)
    c = ok[0].query.shape[0] if ok else 0
    k = max((len(x.clusters) for x in ok), default=0)
    nf = max((len(x.labels) for x in ok), default=0)
    a = {"valid": np.array([x is not None for x in locs]), "query": np.zeros((n, c), np.float32),
         "global": np.zeros((n, c), np.float32), "clusters": np.zeros((n, k, c), np.float32),
         "counts": np.zeros((n, k), np.int32), "n_feats": np.zeros(n, np.int32), "n_clusters": np.zeros(n, np.int32),
         "labels": np.full((n, nf), -1, np.int16), "pos": np.zeros((n, nf, 3), np.int16),
         "grids": np.zeros((n, len(ok[0].grids) if ok else 0, 4), np.int32)}
    # the selected local features keep the feature map's width (a head with a whitening FC pools to fewer dims)
    feats = np.lib.format.open_memmap(d / "feats.npy.tmp", mode="w+", dtype=np.float16,
                                      shape=(n, nf, ok[0].feats.shape[1])) \
        if ok and ok[0].feats is not None else None
    for i, x in enumerate(locs):
        if x is None:
            continue
        kk, m = len(x.clusters), len(x.labels)
        a["query"][i], a["global"][i] = x.query, x.global_
        a["clusters"][i, :kk], a["counts"][i, :kk], a["n_clusters"][i] = x.clusters, x.counts, kk
        a["n_feats"][i], a["labels"][i, :m], a["pos"][i, :m] = m, x.labels, x.pos
        a["grids"][i] = np.asarray(x.grids)
        if feats is not None:
            feats[i, :m] = x.feats
    for name, arr in a.items():
        atomic_write_npy(d / f"{name}.npy", arr)
    if feats is not None:
        feats.flush()
        del feats
        os.replace(d / "feats.npy.tmp", d / "feats.npy")
    atomic_write_bytes(d / "locals.json", json.dumps({"n": n, "arrays": sorted(a) + (["feats"] if ok and ok[0].feats
                                                                                  is not None else [])}).encode())
    return d


def load_locals(directory: str | os.PathLike) -> list[ImageLocal | None]:
    d = Path(directory)
    doc = json.loads((d / "locals.json").read_text())
    a = {name: np.load(d / f"{name}.npy", allow_pickle=False, mmap_mode="r" if name == "feats" else None)
         for name in doc["arrays"]}
    out: list[ImageLocal | None] = []
    for i in range(doc["n"]):
        if not a["valid"][i]:
            out.append(None)
            continue
        m = int(a["n_feats"][i])
        k = int(a["n_clusters"][i])
        out.append(ImageLocal(query=a["query"][i], global_=a["global"][i], clusters=a["clusters"][i, :k],
                              counts=a["counts"][i, :k].astype(np.int64),
                              feats=a["feats"][i, :m] if "feats" in a else None,   # float16, memory-mapped
                              labels=a["labels"][i, :m].astype(np.int64), pos=a["pos"][i, :m].astype(np.int32),
                              grids=[tuple(int(v) for v in g) for g in a["grids"][i]]))
    return out


def recluster(loc: ImageLocal, clusters: int, p: float, w: np.ndarray | None = None, b: np.ndarray | None = None,
              iters: int = 20, n_select: int | None = None) -> ImageLocal:
    """The same image with another K (and optionally a smaller N), from its kept selected features."""
    if loc.feats is None:
        raise ValueError("recluster needs the selected features (keep_feats=True)")
    feats = np.asarray(loc.feats[:n_select] if n_select else loc.feats, dtype=np.float32)
    labels, _ = kmeans_fps(feats, clusters, iters)
    k = int(labels.max()) + 1 if len(labels) else 0
    cl, counts = cluster_gem(feats, labels, k, p)
    return ImageLocal(query=_whiten(gem_np(feats, p), w, b), global_=loc.global_, clusters=_whiten(cl, w, b),
                      counts=counts, feats=feats, labels=labels, pos=loc.pos[:len(feats)], grids=loc.grids)
