"""The one contract between heads and the rest of glimr."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RetrievalOutput:
    """What a head returns.

    descriptor: (B, D) global descriptor, L2-normalised.
    attention:  named attention maps (B, h, w) or (B, k, h, w) for heat maps (empty for GeM).
    local:      (B, C, h, w) local feature map for co-attention re-ranking (the last conv tensor), or None.
    aux:        extra training outputs (e.g. UGALR's intermediate-supervision embedding), never used at search.
    """

    descriptor: torch.Tensor
    attention: dict[str, torch.Tensor] = field(default_factory=dict)
    local: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
