"""DOLG head: multi-atrous branch, local self-attention and orthogonal fusion against direct computations."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from glimr.models.heads.dolg import DOLGHead, orthogonal_component

C4, C5, H, W = 8, 12, 4, 5


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.fixture
def head(randomize_bn):
    torch.manual_seed(0)
    h = DOLGHead(SimpleNamespace(channels={"res4": C4, "res5": C5}), dim=6, atrous_dim=3, dilations=(1, 2, 3))
    randomize_bn(h)
    return h.double().eval()


@pytest.fixture
def maps():
    torch.manual_seed(1)
    return torch.rand(2, C4, H, W, dtype=torch.float64), torch.rand(2, C5, 2, 3, dtype=torch.float64)


def test_multi_atrous_concat_with_broadcast_pooling(head, maps):
    x4, _ = maps
    ma = head.atrous
    pooled = F.relu(ma.pool(x4.mean(dim=(2, 3), keepdim=True))).expand(-1, -1, H, W)
    expected = F.relu(ma.fuse(torch.cat([conv(x4) for conv in ma.atrous] + [pooled], dim=1)))
    torch.testing.assert_close(ma(x4), expected, rtol=1e-9, atol=1e-12)
    default = DOLGHead(SimpleNamespace(channels={"res4": 1024, "res5": 2048}))
    assert [c[0].dilation[0] for c in default.atrous.atrous] == [6, 12, 18]
    assert default.atrous.atrous[0][0].out_channels == 512 and default.dim == 512


def test_local_self_attention(head, maps):
    x, _ = maps
    la = head.attention
    fl, a = la(x)
    f = npy(la.bn(la.conv(x)))                                            # 1x1 conv - BN
    ws, bs = npy(la.score.weight)[0, :, 0, 0], npy(la.score.bias)[0]
    for b in range(2):
        for y in range(H):
            for xx in range(W):
                v = f[b, :, y, xx]
                att = math.log1p(math.exp(ws @ np.maximum(v, 0) + bs))    # softplus(conv1x1(ReLU(f)))
                assert a[b, y, xx].item() == pytest.approx(att, rel=1e-9)
                np.testing.assert_allclose(npy(fl[b, :, y, xx]), v / np.linalg.norm(v) * att, rtol=1e-9)


def test_orthogonal_fusion_pooling_and_descriptor(head, maps):
    x4, x5 = maps
    out = head(x4, lambda _: x5)
    fl, _ = head.attention(head.atrous(x4))
    p = head.pool.p.item()
    for b in range(2):
        g5 = (np.clip(npy(x5[b]), 1e-6, None) ** p).mean(axis=(1, 2)) ** (1 / p)     # GeM(res5)
        fg = npy(head.global_fc.weight) @ g5 + npy(head.global_fc.bias)              # FC to the local dim
        cols = []
        for y in range(H):
            for xx in range(W):
                v = npy(fl[b, :, y, xx])
                orth = v - (v @ fg) / (fg @ fg) * fg                      # f_l minus its projection on f_g
                assert abs(orth @ fg) < 1e-9 * np.linalg.norm(v) * np.linalg.norm(fg) + 1e-12
                cols.append(np.concatenate([fg, orth]))                   # [f_g broadcast, f_orth]
        pooled = np.mean(cols, axis=0)                                    # average pooling
        z = npy(head.fc.weight) @ pooled + npy(head.fc.bias)
        np.testing.assert_allclose(npy(out.descriptor[b]), z / np.linalg.norm(z), rtol=1e-5)
    assert out.attention["A"].shape == (2, H, W) and out.local.shape == (2, C4, H, W)


def test_orthogonal_component_of_a_map():
    torch.manual_seed(2)
    fl, fg = torch.randn(3, 7, 2, 2, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    orth = orthogonal_component(fl, fg)
    assert torch.allclose(torch.einsum("bchw,bc->bhw", orth, fg), torch.zeros(3, 2, 2, dtype=torch.float64),
                          atol=1e-12)
    torch.testing.assert_close(orthogonal_component(fl.mean(dim=(2, 3)), fg), orth.mean(dim=(2, 3)))
