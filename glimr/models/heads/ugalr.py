"""UGALR head (ICLR 2022 submission: "Deep fusion of multi-attentive local and global features with higher
efficiency for image retrieval"): a Local Attention Learning Module (LALM) on res4's output X (C4 channels),
whose channel-average map O is concatenated to X so that res5 reads C4 + 1 channels.

    LALM:  R = ReLU(conv1x1(X))                       reduction to `reduce_dim`
           eq. (1)  theta_v, phi_v, g_v = flatten(theta(R)), flatten(phi(R)), flatten(g(R))   (hw x c')
           eq. (2)  X' = softmax(theta_v phi_v^T)     (hw x hw, each row normalised)
           eq. (3)  Y = view(X' g_v)
           eq. (4)  Z = w(Y)                          (non-local block without its residual)
           G = softplus(conv1x1(Z))                   1x1 channel attention back to C4 channels
           D = G * X
    intermediate supervision: avgpool(D) -> whitening FC -> aux["inter_embedding"] (the trainer adds the class
           logits and the cross-entropy L_a of eq. (5), with weight lambda = 0.6 in eq. (7))
    O = mean_c(D) (1 x h x w);  res5([X, O]) -> GeM (p = 3) -> whitening FC (2048 -> 512) -> L2

Paper gaps, and what this file does (each is a constructor argument):
- The reduced width of the first conv and the non-local inner width are not given: `reduce_dim` (C4 // 2),
  `nl_dim` (reduce_dim // 2, the non-local paper's bottleneck).
- G multiplies X element-wise, so the 1x1 "channel attention" conv maps back to X's C4 channels.
- No 1/sqrt(c') scale in eq. (2) (none printed). phi has no bias: it would add a constant to every logit of a
  row of eq. (2) and cancel in the softmax.
- The intermediate embedding width is not given: `inter_dim` (512, the width of the final embedding). It is
  computed in training mode only (it is never used at search).
- res5's extra input channel is zero-initialised (`Backbone.expand_res5_input(1)`), so a pretrained res5
  starts unchanged; LALM then learns from L_a first and from L_g as those weights grow.

Attention maps returned: "G" = mean over channels of G (B, h, w) and "O" (B, h, w), at stride 16.
`local` = res5's output.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from glimr.models.backbones import Backbone
from glimr.models.output import RetrievalOutput
from glimr.models.pooling import GeM, l2n
from glimr.models.precision import hi, no_autocast




class LALM(nn.Module):
    """X (B, C4, h, w) -> (D = G * X, G), both (B, C4, h, w)."""

    def __init__(self, channels: int, reduce_dim: int, nl_dim: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduce_dim, 1)
        self.theta = nn.Conv2d(reduce_dim, nl_dim, 1)
        self.phi = nn.Conv2d(reduce_dim, nl_dim, 1, bias=False)
        self.g = nn.Conv2d(reduce_dim, nl_dim, 1)
        self.w = nn.Conv2d(nl_dim, reduce_dim, 1)
        self.channel = nn.Conv2d(reduce_dim, channels, 1)

    def spatial(self, r: torch.Tensor, with_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The non-local block without residual: R -> (Z, X'). With `with_attention=False`, X' is not kept
        (None): eqs. (2)-(3) then run as one fused attention (`scaled_dot_product_attention` with scale 1,
        the same softmax(theta_v phi_v^T) g_v in blocks), which never writes the hw x hw matrix out
        (at 1024 x 1024 input Lite0's res4 has 4,096 positions: a 64 MB matrix, 33 ms against 20 ms here)."""
        b, _, h, w = r.shape
        # UGALR eq. (1): flattened 1x1 convolutions, (B, hw, c')
        th = self.theta(r).flatten(2).transpose(1, 2)
        ph = self.phi(r).flatten(2).transpose(1, 2)
        gv = self.g(r).flatten(2).transpose(1, 2)
        with no_autocast(r):                                 # logits and softmax in fp32, also under autocast
            if with_attention:
                # UGALR eq. (2): X' = softmax(theta_v phi_v^T)
                att = torch.softmax(torch.bmm(hi(th), hi(ph.transpose(1, 2))), dim=-1)
                # UGALR eq. (3): Y = view(X' g_v)
                y = torch.bmm(att, hi(gv))
            else:
                att = None
                y = F.scaled_dot_product_attention(hi(th)[:, None], hi(ph)[:, None], hi(gv)[:, None],
                                                   scale=1.0)[:, 0]                # eqs. (2)-(3)
        y = y.to(gv.dtype).transpose(1, 2).reshape(b, -1, h, w)
        return self.w(y), att                                      # UGALR eq. (4): Z = w(Y)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, _ = self.spatial(F.relu(self.reduce(x)), with_attention=False)
        g = F.softplus(self.channel(z))                           # channel attention + softplus -> G
        return g * x, g                                            # D = G * X


class UGALRHead(nn.Module):
    """UGALR. kwargs (defaults): dim=512, inter_dim=512, reduce_dim=None (C4 // 2), nl_dim=None
    (reduce_dim // 2), p=3.0, learn_p=False (Sec. 4: "parameter p of GeM pooling is set as 3"). Expands the
    backbone's res5 input by one channel (once)."""

    def __init__(self, backbone: Backbone, dim: int = 512, inter_dim: int = 512,
                 reduce_dim: int | None = None, nl_dim: int | None = None, p: float = 3.0,
                 learn_p: bool = False):
        super().__init__()
        c4, c5 = backbone.channels["res4"], backbone.channels["res5"]
        if backbone.channels.get("res5_in", c4) == c4:
            backbone.expand_res5_input(1)                          # res5 takes [X, O]: C4 + 1 channels
        elif backbone.channels["res5_in"] != c4 + 1:
            raise ValueError(f"UGALR needs res5 to take {c4 + 1} input channels, this backbone takes "
                             f"{backbone.channels['res5_in']}")
        reduce_dim = reduce_dim or max(8, c4 // 2)
        nl_dim = nl_dim or max(4, reduce_dim // 2)
        self.lalm = LALM(c4, reduce_dim, nl_dim)
        self.inter_whiten = nn.Linear(c4, inter_dim)
        self.pool = GeM(p, learnable=learn_p)
        self.whiten = nn.Linear(c5, dim)
        self.dim = dim

    def forward(self, res4: torch.Tensor, res5: Callable[[torch.Tensor], torch.Tensor]) -> RetrievalOutput:
        d, g = self.lalm(res4)
        o = d.mean(dim=1, keepdim=True)                            # channel average pooling -> O (1 x h x w)
        f5 = res5(torch.cat([res4, o.to(res4.dtype)], dim=1))
        desc = l2n(hi(self.whiten(self.pool(f5)))).float()
        aux = {}
        if self.training:                                          # intermediate supervision (L_a, eq. (5))
            aux["inter_embedding"] = self.inter_whiten(d.mean(dim=(2, 3)))
        maps = {"G": hi(g).mean(dim=1), "O": hi(o[:, 0])}
        return RetrievalOutput(descriptor=desc, attention=maps, local=f5, aux=aux)
