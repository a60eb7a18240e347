"""GeM baseline head (Radenovic et al., TPAMI 2019): res5 -> GeM -> optional whitening FC -> L2."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput
from glimr.models.pooling import GeM, l2n


class GeMHead(nn.Module):
    def __init__(self, backbone: Backbone, p: float = 3.0, dim: int | None = None, learn_p: bool = True):
        super().__init__()
        c5 = backbone.channels["res5"]
        self.pool = GeM(p, learnable=learn_p)
        # learnable whitening: a fully connected layer with bias (as in the GeM paper); none by default
        self.whiten = nn.Linear(c5, dim, bias=True) if dim else None
        self.dim = dim or c5

    def forward(self, res4: torch.Tensor, res5: Callable[[torch.Tensor], torch.Tensor]) -> RetrievalOutput:
        f5 = res5(res4)
        g = self.pool(f5)
        if self.whiten is not None:
            g = self.whiten(g)
        return RetrievalOutput(descriptor=l2n(g.float()), local=f5)
