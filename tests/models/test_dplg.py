"""DPLG head: RFB, eqs. (1)-(3) and the final fusion against direct, slow computations (float64)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference_ops import bn_relu_ref, conv_ref

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


def test_receptive_field_block_against_a_direct_computation(head, maps):
    """RFB (Sec. 3.2, Fig. 1): each branch conv k x k -> conv 3 x 3 dilated r (each conv-BN-ReLU), the GeM
    vector of X4 broadcast over the map, all concatenated, a 1 x 1 conv, BN, ReLU; computed from the weights
    position by position (float64; GeM runs in fp32 in the module: rel. 1e-5)."""
    x4, _ = maps
    rfb = head.rfb
    out = npy(rfb(x4))
    p = float(rfb.gem.p)
    assert p == 3.0                                                    # DPLG Sec. 3: p = 3, fixed
    wf = npy(rfb.fuse.weight)[:, :, 0, 0]
    for b in range(2):
        x = npy(x4[b])
        parts = []
        for branch, (k, r) in zip(rfb.branches, [(1, 1), (3, 3), (5, 5)], strict=True):
            c1, c2 = branch[0], branch[1]
            assert c1[0].kernel_size == (k, k) and c2[0].kernel_size == (3, 3) and c2[0].dilation == (r, r)
            y = bn_relu_ref(conv_ref(x, npy(c1[0].weight)), c1[1])
            parts.append(bn_relu_ref(conv_ref(y, npy(c2[0].weight), dilation=r), c2[1]))
        g = gem_ref(x, p)
        cat = np.concatenate(parts + [np.broadcast_to(g[:, None, None], x.shape)])
        want = bn_relu_ref(np.einsum("oc,chw->ohw", wf, cat), rfb.bn)
        np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-7)
    assert out.shape == tuple(x4.shape)


def test_eq1_to_eq3_dot_product_fusion(head, maps):
    x4, x5 = maps
    x4p = head.rfb(x4)
    out = head(x4, lambda _: x5)
    p = float(head.pool.p)
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
