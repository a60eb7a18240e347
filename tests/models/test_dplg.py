"""DPLG head: RFB, eqs. (1)-(3) and the final fusion against direct, slow computations (float64)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from glimr.models.heads.dplg import DPLGHead

C4, C5, H, W = 8, 12, 4, 5


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def gem_ref(x: np.ndarray, p: float) -> np.ndarray:
    """DPLG eq. (1): (1/L sum_l x_l^p)^(1/p), x (C, h, w)."""
    c = x.shape[0]
    flat = np.clip(x.reshape(c, -1), 1e-6, None)
    return np.array([(sum(v ** p for v in flat[k]) / flat.shape[1]) ** (1 / p) for k in range(c)])


@pytest.fixture
def head(randomize_bn):
    torch.manual_seed(0)
    h = DPLGHead(SimpleNamespace(channels={"res4": C4, "res5": C5}), dim=6, rfb_width=3)
    randomize_bn(h)
    return h.double().eval()


@pytest.fixture
def maps():
    torch.manual_seed(1)
    return torch.rand(2, C4, H, W, dtype=torch.float64), torch.rand(2, C5, 2, 3, dtype=torch.float64)


def test_receptive_field_block_concat_with_broadcast_gem(head, maps):
    x4, _ = maps
    rfb = head.rfb
    out = rfb(x4)
    p = rfb.gem.p.item()
    g = torch.from_numpy(np.stack([gem_ref(npy(x4[b]), p) for b in range(2)]))
    cat = torch.cat([br(x4) for br in rfb.branches] + [g[:, :, None, None].expand(-1, -1, H, W)], dim=1)
    expected = F.relu(rfb.bn(rfb.fuse(cat)))                          # concatenated, 1x1 conv (+BN, ReLU)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)   # GeM itself runs in fp32
    assert out.shape == x4.shape
    ks = [(br[0][0].kernel_size[0], br[1][0].dilation[0]) for br in rfb.branches]
    assert ks == [(1, 1), (3, 3), (5, 5)]


def test_eq1_to_eq3_dot_product_fusion(head, maps):
    x4, x5 = maps
    x4p = head.rfb(x4)
    out = head(x4, lambda _: x5)
    p = head.pool.p.item()
    for b in range(2):
        vg = gem_ref(npy(x5[b]), p)                                       # eq. (1)
        vg2 = npy(head.reduce.weight)[:, :, 0, 0] @ vg + npy(head.reduce.bias)   # V_g' = conv1x1(V_g)
        xq = npy(head.fusion.q.weight)[:, :, 0, 0] @ vg2 + npy(head.fusion.q.bias)
        flat = npy(x4p[b]).reshape(C4, -1)
        xk = np.stack([npy(head.fusion.k.weight)[:, :, 0, 0] @ flat[:, l] for l in range(H * W)])   # (L, D4)
        xv = np.stack([npy(head.fusion.v.weight)[:, :, 0, 0] @ flat[:, l] + npy(head.fusion.v.bias)
                       for l in range(H * W)])
        s = [xq @ xk[l] / math.sqrt(C4) for l in range(H * W)]
        a = np.array([math.exp(v) / sum(math.exp(u) for u in s) for v in s])   # eq. (2)
        vl = sum(a[l] * xv[l] for l in range(H * W))                            # eq. (3): V_l = A X_V
        np.testing.assert_allclose(npy(out.attention["A"][b]).ravel(), a, rtol=1e-9)
        f = npy(head.fc.weight) @ (vg2 + vl) + npy(head.fc.bias)               # FC(V_g' + V_l)
        np.testing.assert_allclose(npy(out.descriptor[b]), f / np.linalg.norm(f), rtol=1e-5)
    assert out.attention["A"].shape == (2, H, W) and out.local.shape == (2, C4, H, W)


def test_default_widths():
    h = DPLGHead(SimpleNamespace(channels={"res4": 1024, "res5": 2048}))
    assert h.dim == 512 and h.rfb.branches[0][0][0].out_channels == 64
    h = DPLGHead(SimpleNamespace(channels={"res4": 112, "res5": 1280}), rfb_branches=((1, 1), (3, 2)))
    assert h.rfb.branches[0][0][0].out_channels == 32 and len(h.rfb.branches) == 2
