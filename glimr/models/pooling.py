"""Pooling layers."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalized mean over the spatial dimensions: (mean x^p)^(1/p), x clamped at eps. (B, C, H, W) -> (B, C)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling (Radenovic et al.) with a learnable (or fixed) exponent p, default 3."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p))) if learnable else float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pow in fp32: x^3 of bf16 activations loses the small values GeM depends on
        return gem(x.float(), self.p, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        p = self.p.item() if isinstance(self.p, torch.Tensor) else self.p
        return f"p={p:.3f}, eps={self.eps}"


def l2n(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    return F.normalize(x, p=2, dim=dim, eps=eps)
