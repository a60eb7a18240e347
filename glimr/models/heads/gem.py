"""GeM baseline head (Radenovic et al., TPAMI 2019): res5 -> GeM -> L2 -> optional whitening FC -> L2.

The whitening FC acts on the L2-normalised GeM vector, as in the paper's network (its learned whitening is
fitted on L2-normalised descriptors and initialises the FC); ``norm_before_whiten=False`` feeds it the raw
GeM vector instead. :func:`init_whiten_pca` sets the FC to a PCA-whitening of given descriptors (the paper
initialises it with its learned whitening before end-to-end training)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput
from glimr.models.pooling import GeM, l2n


class GeMHead(nn.Module):
    def __init__(self, backbone: Backbone, p: float = 3.0, dim: int | None = None, learn_p: bool = True,
                 norm_before_whiten: bool = True):
        super().__init__()
        self.norm_before_whiten = bool(norm_before_whiten)
        c5 = backbone.channels["res5"]
        self.pool = GeM(p, learnable=learn_p)
        # learnable whitening: a fully connected layer with bias (as in the GeM paper); none by default
        self.whiten = nn.Linear(c5, dim, bias=True) if dim else None
        self.dim = dim or c5

    def forward(self, res4: torch.Tensor, res5: Callable[[torch.Tensor], torch.Tensor]) -> RetrievalOutput:
        f5 = res5(res4)
        g = self.pool(f5)
        if self.whiten is not None:
            g = self.whiten(l2n(g.float()) if self.norm_before_whiten else g)
        return RetrievalOutput(descriptor=l2n(g.float()), local=f5)


@torch.no_grad()
def init_whiten_pca(head: GeMHead, pooled: torch.Tensor | np.ndarray, shrink: float = 0.5) -> None:
    """Set ``head.whiten`` (D -> D') to the PCA-whitening ``x -> (x - mu) P`` fitted on ``pooled`` (N, D), the
    head's GeM vectors (L2-normalised by the fit, as the head feeds them when ``norm_before_whiten``):
    weight = P^T, bias = -mu P, keeping the D' strongest directions; ``shrink`` as in
    :func:`glimr.models.whiten.fit_pca_whitening`."""
    from glimr.models.whiten import fit_pca_whitening

    if head.whiten is None:
        raise ValueError("the GeM head has no whitening FC to initialise (give head_kwargs dim)")
    if not head.norm_before_whiten:
        raise ValueError("PCA initialisation needs norm_before_whiten=True (the fit L2-normalises)")
    x = pooled.detach().cpu().numpy() if isinstance(pooled, torch.Tensor) else pooled
    w = fit_pca_whitening(x, dim=head.whiten.out_features, shrink=shrink)
    head.whiten.weight.copy_(w.proj.T)
    head.whiten.bias.copy_(-(w.mean @ w.proj))
