"""RetrievalNet = backbone + head (the head does its own pooling, projection and L2 normalisation)
+ an optional PCA-whitening stage (`glimr.models.whiten`) on the head's descriptor."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput


class RetrievalNet(nn.Module):
    """Takes RGB images in [0, 1], (B, 3, H, W); returns a `RetrievalOutput`.

    ``pcaw``: None, or a `glimr.models.whiten.PCAWhitening` (set by `attach_whitening`, rebuilt by
    `load_model` from ``config["pca_whiten"]``) that replaces the descriptor by its whitened version."""

    def __init__(self, backbone: Backbone, head: nn.Module, name: str, config: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.add_module("pcaw", None)
        self.name = name
        self.config = dict(config)  # everything needed to rebuild this net: saved next to checkpoints

    @property
    def dim(self) -> int:
        """The descriptor dimension (after the PCA-whitening when there is one)."""
        return int(self.pcaw.dim) if self.pcaw is not None else int(self.head.dim)

    def forward(self, x: torch.Tensor) -> RetrievalOutput:
        out = self.head(self.backbone.forward_res4(x), self.backbone.res5)
        if self.pcaw is not None:
            out = dataclasses.replace(out, descriptor=self.pcaw(out.descriptor))
        return out
