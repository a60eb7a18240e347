"""DPLG head (Hu & Bors, ICIP 2022: "Dot-product based global and local feature fusion for image search").

    X4 = res4 (D4 ch), X5 = res5 (D5 ch)
    RFB:     X4' = conv1x1([branch_1(X4), ..., branch_n(X4), broadcast(GeM(X4))])
             branch = conv k x k (kernel size varies) -> conv 3x3 with dilation r (dilation varies)
    eq. (1)  V_g = GeM(X5) (p = 3);   V_g' = conv1x1(V_g) in R^{D4}
             X_Q = Q(V_g'),  X_K = K(X4'),  X_V = V(X4')            (1x1 convolutions, D4 -> D4)
    eq. (2)  A = softmax(X_Q X_K^T / sqrt(D4))                        (1 x h4 w4)
    eq. (3)  V_l = A X_V
             F = FC(V_g' + V_l) in R^512, L2-normalised

Paper gaps, and what this file does (each is a constructor argument):
- The RFB's kernel sizes, dilations and widths are in Fig. 1 only, not in the text: `rfb_branches`
  ((1, 1), (3, 3), (5, 5)) as (kernel, dilation) pairs, the RFB-Net pattern (Liu et al., ECCV 2018) the paper
  adapts, and `rfb_width` (max(32, D4 // 16) per branch: 64 for ResNet-50, so that the head stays well under a
  quarter of the backbone's cost). Convs are conv-BN-ReLU (RFB-Net's BasicConv); the fusing 1x1 conv is
  followed by BN + ReLU.
- The GeM branch vector is broadcast back (footnote 1) and concatenated; its share of the fusing 1x1 conv is
  applied once to the vector and broadcast (same result as convolving the constant map).
- K and V are 1x1 convolutions, so A and V_l are computed without materialising X_K and X_V:
  X_Q X_K^T = (X_Q W_K) X4'^T (K has no bias: it would add the same constant to every logit), and, since A
  sums to 1, A X_V = W_V (A X4') + b_V. Identical to eqs. (2)-(3) (the test checks it against the direct
  form).

Attention map returned: "A" (B, h4, w4). `local` = X4' (the RFB-refined res4 map, stride 16).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import Conv2dNormActivation

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput
from glimr.models.pooling import GeM, l2n
from glimr.models.precision import hi, no_autocast




class ReceptiveFieldBlock(nn.Module):
    """RFB with a GeM branch (DPLG Sec. 3.2): X4 (B, D4, h, w) -> X4' (B, D4, h, w)."""

    def __init__(self, channels: int, width: int,
                 branches: Sequence[Sequence[int]] = ((1, 1), (3, 3), (5, 5)), p: float = 3.0,
                 learn_p: bool = True):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(Conv2dNormActivation(channels, width, int(k)),
                          Conv2dNormActivation(width, width, 3, dilation=int(r)))
            for k, r in branches)
        self.gem = GeM(p, learnable=learn_p)
        self.n_conv = width * len(self.branches)
        # 1x1 conv over [branch outputs, broadcast GeM vector]; BN + ReLU after it
        self.fuse = nn.Conv2d(self.n_conv + channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = torch.cat([b(x) for b in self.branches], dim=1)
        g = self.gem(x)                                             # (B, D4): the GeM branch
        w = self.fuse.weight.flatten(1)                             # (D4, n_conv + D4)
        # conv1x1(concat[ys, broadcast(g)]) = conv1x1_ys(ys) + broadcast(W_g g)
        out = F.conv2d(ys, self.fuse.weight[:, : self.n_conv])
        out = out + F.linear(g, w[:, self.n_conv:])[..., None, None]
        return F.relu(self.bn(out))


class DotProductFusion(nn.Module):
    """DPLG Sec. 3.3: (X4' (B, D4, h, w), V_g' (B, D4)) -> (V_l (B, D4), A (B, h*w))."""

    def __init__(self, channels: int):
        super().__init__()
        self.q = nn.Conv2d(channels, channels, 1)                   # on V_g' as a D4 x 1 x 1 map (footnote 2)
        self.k = nn.Conv2d(channels, channels, 1, bias=False)
        self.v = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, vg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d4 = x.shape[1]
        xf = x.flatten(2)                                            # (B, D4, L)
        xq = F.linear(vg, self.q.weight.flatten(1), self.q.bias)     # X_Q (B, D4)
        qk = F.linear(xq, self.k.weight.flatten(1).t())              # X_Q W_K (B, D4)
        with no_autocast(x):                                         # attention in fp32, also under autocast
            logits = torch.einsum("bc,bcl->bl", hi(qk), hi(xf))   # X_Q X_K^T
            a = torch.softmax(logits / math.sqrt(d4), dim=-1)        # DPLG eq. (2)
            ax = torch.einsum("bl,bcl->bc", a, hi(xf))           # A X4'
        vl = F.linear(ax.to(vg.dtype), self.v.weight.flatten(1), self.v.bias)   # DPLG eq. (3): V_l = A X_V
        return vl, a


class DPLGHead(nn.Module):
    """DPLG. kwargs (defaults): dim=512, rfb_width=None (max(32, D4 // 16)),
    rfb_branches=((1, 1), (3, 3), (5, 5)), p=3.0, learn_p=False (Sec. 3: "The power coefficient is set as
    p = 3"; learn_p=True learns it, as GeM's authors do)."""

    def __init__(self, backbone: Backbone, dim: int = 512, rfb_width: int | None = None,
                 rfb_branches: Sequence[Sequence[int]] = ((1, 1), (3, 3), (5, 5)), p: float = 3.0,
                 learn_p: bool = False):
        super().__init__()
        c4, c5 = backbone.channels["res4"], backbone.channels["res5"]
        self.rfb = ReceptiveFieldBlock(c4, rfb_width or max(32, c4 // 16), rfb_branches, p, learn_p)
        self.pool = GeM(p, learnable=learn_p)
        self.reduce = nn.Conv2d(c5, c4, 1)                           # V_g -> V_g' (1x1 conv on the vector)
        self.fusion = DotProductFusion(c4)
        self.fc = nn.Linear(c4, dim)
        self.dim = dim

    def forward(self, res4: torch.Tensor, res5: Callable[[torch.Tensor], torch.Tensor]) -> RetrievalOutput:
        x5 = res5(res4)
        x4 = self.rfb(res4)                                          # X4'
        vg = self.pool(x5)                                           # DPLG eq. (1): V_g = GeM(X5)
        vg = F.linear(vg, self.reduce.weight.flatten(1), self.reduce.bias)   # V_g'
        vl, a = self.fusion(x4, vg)
        desc = l2n(hi(self.fc(vg + vl.to(vg.dtype)))).float()            # F = FC(V_g' + V_l)
        return RetrievalOutput(descriptor=desc, attention={"A": a.view(-1, *x4.shape[-2:])}, local=x4)
