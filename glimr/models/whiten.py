"""Whitening of a model's global descriptor: PCA-whitening (no labels) and the supervised learned whitening
(Lw) of Radenovic et al. from matching pairs. Fitted by `glimr whiten` (glimr/train/whiten.py).

Not part of the CiDeR paper (nor of the other heads' papers): it is the learned whitening of Radenovic
et al.'s GeM paper (TPAMI 2019, "learned whitening" post-processing), here the unsupervised variant, a PCA
of the descriptors of training images (no matching pairs needed)::

    d' = L2( (L2(d) - mu) @ P ),   P = V[:, :D'] / sqrt(lambda[:D'] + shrink * mean(lambda[:D']))

where mu is the mean of the L2-normalised training descriptors, V and lambda the eigenvectors and
eigenvalues (descending) of their covariance, and D' the output dimension. ``shrink`` > 0 damps the
amplification of the weakest kept directions (0: plain PCA-whitening).

The fitted transform is a :class:`PCAWhitening` module (two float32 buffers) that
:func:`attach_whitening` puts into a `RetrievalNet` as ``net.pcaw``: the net then returns whitened
descriptors (at every scale of a multi-scale extraction, before the scales are summed), and
`save_model` / `load_model` save and rebuild it from the checkpoint's ``config["pca_whiten"]``.

:func:`fit_learned_whitening` gives the same module form (``mean``, ``proj``) from descriptors and matching
pairs (views of one place or object); see its docstring for the formula.

The training images must not be the benchmark's: `glimr whiten` refuses UKBench and evaluation-set folders.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glimr.models.precision import hi, no_autocast

__all__ = ["PCAWhitening", "attach_whitening", "detach_whitening", "fit_learned_whitening", "fit_pca_whitening"]


class PCAWhitening(nn.Module):
    """``desc (B, D) -> L2((L2(desc) - mean) @ proj)``, (B, D'); buffers ``mean`` (D,) and ``proj`` (D, D')."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(int(in_dim), dtype=torch.float32))
        self.register_buffer("proj", torch.zeros(int(in_dim), int(dim), dtype=torch.float32))

    @property
    def in_dim(self) -> int:
        return int(self.proj.shape[0])

    @property
    def dim(self) -> int:
        return int(self.proj.shape[1])

    def forward(self, desc: torch.Tensor) -> torch.Tensor:
        if desc.shape[-1] != self.in_dim:
            raise ValueError(f"PCA-whitening expects {self.in_dim}-dim descriptors, got {tuple(desc.shape)}")
        with no_autocast(desc):  # fp32: whitening amplifies the weak directions, bf16 would drown them
            x = F.normalize(hi(desc), dim=-1)
            return F.normalize((x - self.mean) @ self.proj, dim=-1)


def _descriptor_rows(descs: np.ndarray, dim: int | None) -> tuple[np.ndarray, int]:
    """``descs`` as float64 (N, D) rows checked (2-D, finite, no zero row) and L2-normalised, and the output
    dimension (``dim``, default D, checked to lie in 1..D)."""
    x = np.asarray(descs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be an (N, D) array, not shape {x.shape}")
    d = x.shape[1]
    dim = d if dim is None else int(dim)
    if not 1 <= dim <= d:
        raise ValueError(f"whitening dim {dim} must be between 1 and the descriptor dimension {d}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} descriptors are all-zero (failed images?): drop them first")
    return x / norms, dim


def fit_pca_whitening(descs: np.ndarray, dim: int | None = None, shrink: float = 0.0) -> PCAWhitening:
    """Fit the PCA-whitening (module doc) on ``descs`` (N, D) in float64; ``dim`` = D' (default D).

    The covariance is the biased one (1/N), so the whitened, not yet re-normalised training descriptors
    ``(L2(d) - mu) @ P`` have exactly the identity covariance (1/N) when ``shrink`` is 0. The sign of each
    eigenvector is fixed (its largest-magnitude entry positive) so that a fit is reproducible.

    Raises ValueError for fewer than D'+1 samples (2 with a ``shrink`` > 0), D' outside 1..D, a negative ``shrink``, zero or
    non-finite rows, or descriptors that span fewer than D' directions (use a smaller ``dim`` or a
    ``shrink`` > 0)."""
    if not (shrink >= 0 and np.isfinite(shrink)):
        raise ValueError(f"shrink must be a finite number >= 0, not {shrink}")
    x, dim = _descriptor_rows(descs, dim)
    n, d = x.shape
    if n < (dim + 1 if shrink == 0 else 2):  # shrink > 0 keeps every kept direction's divisor positive
        raise ValueError(f"PCA-whitening to {dim} dims needs at least {dim + 1} descriptors, got {n}: use more "
                         f"training images, a smaller dim or a shrink > 0")
    mu = x.mean(axis=0)
    xc = x - mu
    cov = xc.T @ xc / n
    lam, vec = np.linalg.eigh(cov)                 # ascending
    lam, vec = lam[::-1][:dim], vec[:, ::-1][:, :dim]
    if shrink == 0 and lam[-1] <= 1e-12 * max(lam[0], 1e-300):
        rank = int((lam > 1e-12 * max(lam[0], 1e-300)).sum())
        raise ValueError(f"the {n} descriptors span only {rank} directions, fewer than dim {dim}: use "
                         f"--dim {rank} or less, more images, or --shrink > 0")
    lam = np.clip(lam, 0.0, None)
    big = np.abs(vec).argmax(axis=0)
    vec = vec * np.sign(vec[big, np.arange(dim)])   # sign convention: largest entry positive
    proj = vec / np.sqrt(lam + shrink * lam.mean())
    out = PCAWhitening(d, dim)
    out.mean.copy_(torch.from_numpy(mu.astype(np.float32)))
    out.proj.copy_(torch.from_numpy(proj.astype(np.float32)))
    out.shrink = float(shrink)
    return out


def fit_learned_whitening(descs: np.ndarray, pairs: np.ndarray, dim: int | None = None,
                          reg: float = 0.1) -> PCAWhitening:
    """The supervised learned whitening (Lw) of Radenovic et al. (GeM, TPAMI 2019, Sec. 3.3), as their
    cirtorch code computes it, from ``descs`` (N, D) and matching ``pairs`` (M, 2) of row indices::

        x = L2(d), mu = mean(x)
        C_S = 1/M sum_{(i,j) in pairs} (x_i - x_j)(x_i - x_j)^T + reg * tr(C_S)/D * I   (within-instance)
        W = C_S^{-1/2}                                  (symmetric inverse square root)
        C_D = cov(W (x - mu))  = V diag(lambda) V^T     (eigenvalues descending)
        d' = L2( (x - mu) @ W @ V[:, :D'] )

    W removes the directions along which views of one instance differ (illumination, viewpoint, night),
    V keeps the D' most discriminative directions of what remains. ``reg`` (not in the paper; 0 = as
    written) shrinks C_S towards a multiple of the identity: with fewer independent pairs than dimensions
    C_S is singular. Returns a :class:`PCAWhitening` (same ``mean`` / ``proj`` form), ``proj`` = W V[:, :D']."""
    x, dim = _descriptor_rows(descs, dim)
    n, d = x.shape
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError(f"pairs must be a non-empty (M, 2) array of row indices, not shape {pairs.shape}")
    if pairs.min() < 0 or pairs.max() >= n or (pairs[:, 0] == pairs[:, 1]).any():
        raise ValueError(f"pairs must index two different rows of the {n} descriptors")
    if not (reg >= 0 and np.isfinite(reg)):
        raise ValueError(f"reg must be a finite number >= 0, not {reg}")
    mu = x.mean(axis=0)
    df = x[pairs[:, 0]] - x[pairs[:, 1]]
    cs = df.T @ df / len(df)
    cs += reg * np.trace(cs) / d * np.eye(d)
    lam_s, vec_s = np.linalg.eigh(cs)
    if lam_s[0] <= 1e-12 * lam_s[-1]:
        raise ValueError(f"the {len(pairs)} pairs span too few directions for {d} dims: use more pairs or reg > 0")
    w = (vec_s / np.sqrt(lam_s)) @ vec_s.T            # C_S^{-1/2}, symmetric
    y = (x - mu) @ w
    _, vec = np.linalg.eigh(y.T @ y / n)
    vec = vec[:, ::-1][:, :dim]
    big = np.abs(vec).argmax(axis=0)
    vec = vec * np.sign(vec[big, np.arange(dim)])       # sign convention: largest entry positive
    out = PCAWhitening(d, dim)
    out.mean.copy_(torch.from_numpy(mu.astype(np.float32)))
    out.proj.copy_(torch.from_numpy((w @ vec).astype(np.float32)))
    out.shrink = 0.0
    return out


def attach_whitening(net, pcaw: PCAWhitening, source: str) -> None:
    """Put ``pcaw`` into ``net`` (``net.pcaw``) and record it in ``net.config["pca_whiten"]``.

    ``pcaw`` must take the descriptors of the net without whitening (its head's dim)."""
    head_dim = int(net.head.dim)
    if pcaw.in_dim != head_dim:
        raise ValueError(f"PCA-whitening takes {pcaw.in_dim}-dim descriptors but {getattr(net, 'name', 'the net')} "
                         f"produces {head_dim}-dim ones")
    p = next(net.parameters(), None)
    net.pcaw = pcaw.to(p.device) if p is not None else pcaw
    net.config["pca_whiten"] = {"dim": pcaw.dim, "in_dim": pcaw.in_dim,
                                "shrink": float(getattr(pcaw, "shrink", 0.0)), "source": str(source)}


def detach_whitening(net) -> PCAWhitening | None:
    """Remove the net's PCA-whitening (and its config record); returns it (None if there was none)."""
    old = getattr(net, "pcaw", None)
    net.pcaw = None
    net.config.pop("pca_whiten", None)
    return old
