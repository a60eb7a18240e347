"""DOLG head (Yang et al., ICCV 2021: "DOLG: single-stage image retrieval with deep orthogonal fusion of local
and global features"), the baseline the GLAM / CiDeR / DPLG papers compare against.

    local branch on res4 (C4 ch):
        multi-atrous:   [conv3x3_d6(X4), conv3x3_d12(X4), conv3x3_d18(X4), broadcast(ReLU(conv1x1(GAP(X4))))]
                        -> concat -> conv1x1 -> ReLU                                  (C_l = C4 channels)
        self-attention: f = BN(conv1x1(.));  a = softplus(conv1x1(ReLU(f)))  (one map)
                        f_l = (f / |f|_2) * a                                          (per position)
    global branch:      f_g = FC(GeM(res5)) in R^{C_l}
    orthogonal fusion:  f_proj = (f_l . f_g) f_g / |f_g|^2,  f_orth = f_l - f_proj     (per position)
                        [broadcast(f_g), f_orth] -> average pool -> FC -> 512 -> L2

Choices, each a constructor argument: `atrous_dim` (per atrous branch; C4 // 2 = 512 for ResNet-50 as in the
authors' release), `dilations` (6, 12, 18), `local_dim` (C4 = 1024 for ResNet-50). Atrous branches are
conv-BN-ReLU (DeepLab ASPP), the image-pooling branch conv-ReLU (no BN: batches of one must train).
The average pool of [broadcast(f_g), f_orth] is computed as [f_g, mean(f_orth)], and mean(f_orth) as the
orthogonal component of mean(f_l) (projection is linear): the same numbers without the 2 C_l x h x w tensor.
The image-pooling branch's share of the 1x1 conv is applied to the vector once and broadcast.

Cost: at the authors' widths the local branch is heavy (three 3x3 convs 1024 -> 512 on ResNet-50's res4: 29
GFLOPs at 512 x 512, 68% of the backbone's). On the CPU it adds 49% (512) and 63% (1024) to GeM's time on
ResNet-50 (`benchmarks/results/heads_cpu_fp32.md`), over the 25% that glimr's own heads keep to; the default
stays the published baseline. `atrous_dim=128` adds 11% / 20%, but is then a narrower DOLG than the papers'.

Attention map returned: "A" = the softplus attention a (B, h4, w4). `local` = f_l (stride 16).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import Conv2dNormActivation

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput
from glimr.models.pooling import GeM, l2n
from glimr.models.precision import hi



class MultiAtrous(nn.Module):
    """Three dilated 3x3 convs + a global-average branch, concatenated, 1x1 conv + ReLU."""

    def __init__(self, channels: int, width: int, out_channels: int, dilations: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.atrous = nn.ModuleList(Conv2dNormActivation(channels, width, 3, dilation=int(d))
                                    for d in dilations)
        self.pool = nn.Conv2d(channels, width, 1)
        self.n_conv = width * len(self.atrous)
        self.fuse = nn.Conv2d(self.n_conv + width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = torch.cat([conv(x) for conv in self.atrous], dim=1)
        p = F.relu(F.linear(x.mean(dim=(2, 3)), self.pool.weight.flatten(1), self.pool.bias))   # (B, width)
        w = self.fuse.weight.flatten(1)
        # conv1x1(concat[ys, broadcast(p)]) = conv1x1_ys(ys) + broadcast(W_p p + b)
        out = F.conv2d(ys, self.fuse.weight[:, : self.n_conv])
        out = out + F.linear(p, w[:, self.n_conv:], self.fuse.bias)[..., None, None]
        return F.relu(out)


class LocalAttention(nn.Module):
    """DOLG's self-attention module: f = BN(conv1x1(x)); a = softplus(conv1x1(ReLU(f))); f_l = l2n(f) * a."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.score = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.bn(self.conv(x))
        a = F.softplus(hi(self.score(F.relu(f))))               # (B, 1, h, w)
        fl = F.normalize(hi(f), p=2, dim=1) * a
        return fl.to(x.dtype), a[:, 0]


def orthogonal_component(fl: torch.Tensor, fg: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DOLG orthogonal fusion: f_orth = f_l - (f_l . f_g) f_g / |f_g|^2, f_l (B, C, ...) or (B, C)."""
    shape = (fg.shape[0], fg.shape[1]) + (1,) * (fl.dim() - 2)
    g = fg.view(shape)
    norm2 = (fg * fg).sum(dim=1).clamp_min(eps).view((-1,) + (1,) * (fl.dim() - 1))
    proj = (fl * g).sum(dim=1, keepdim=True) / norm2
    return fl - proj * g


class DOLGHead(nn.Module):
    """DOLG. kwargs (defaults): dim=512, local_dim=None (C4), atrous_dim=None (C4 // 2),
    dilations=(6, 12, 18), p=3.0, learn_p=True."""

    def __init__(self, backbone: Backbone, dim: int = 512, local_dim: int | None = None,
                 atrous_dim: int | None = None, dilations: Sequence[int] = (6, 12, 18), p: float = 3.0,
                 learn_p: bool = True):
        super().__init__()
        c4, c5 = backbone.channels["res4"], backbone.channels["res5"]
        cl = local_dim or c4
        self.atrous = MultiAtrous(c4, atrous_dim or max(8, c4 // 2), cl, dilations)
        self.attention = LocalAttention(cl)
        self.pool = GeM(p, learnable=learn_p)
        self.global_fc = nn.Linear(c5, cl)
        self.fc = nn.Linear(2 * cl, dim)
        self.dim = dim

    def forward(self, res4: torch.Tensor, res5: Callable[[torch.Tensor], torch.Tensor]) -> RetrievalOutput:
        fl, a = self.attention(self.atrous(res4))
        fg = hi(self.global_fc(self.pool(res5(res4))))           # f_g = FC(GeM(res5))
        # DOLG orthogonal fusion + average pooling: pool([f_g, f_orth]) = [f_g, orth(mean f_l)]
        orth = orthogonal_component(hi(fl).mean(dim=(2, 3)), fg)
        desc = l2n(hi(self.fc(torch.cat([fg, orth], dim=1)))).float()
        return RetrievalOutput(descriptor=desc, attention={"A": a}, local=fl)
