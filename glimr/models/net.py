"""RetrievalNet = backbone + head (the head does its own pooling, projection and L2 normalisation)."""
from __future__ import annotations

import torch
from torch import nn

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput


class RetrievalNet(nn.Module):
    """Takes RGB images in [0, 1], (B, 3, H, W); returns a `RetrievalOutput`."""

    def __init__(self, backbone: Backbone, head: nn.Module, name: str, config: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name
        self.config = dict(config)  # everything needed to rebuild this net: saved next to checkpoints

    @property
    def dim(self) -> int:
        return int(self.head.dim)

    def forward(self, x: torch.Tensor) -> RetrievalOutput:
        return self.head(self.backbone.forward_res4(x), self.backbone.res5)
