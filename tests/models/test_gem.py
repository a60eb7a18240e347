"""GeM baseline head (Radenovic et al.): res5 -> GeM -> L2 -> whitening FC -> L2, checked against the formulas
computed here (fp32/fp64 on random maps; the packaged Lite0 gives the channel count)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from glimr.models.backbones import build_backbone
from glimr.models.heads.gem import GeMHead, init_whiten_pca


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("lite0", weights="none")


def _gem(x: torch.Tensor, p: float) -> torch.Tensor:
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


@pytest.mark.parametrize("norm", [True, False])
def test_whitening_fc_acts_on_the_normalised_gem_vector(backbone, norm):
    torch.manual_seed(0)
    head = GeMHead(backbone, dim=8, learn_p=False, norm_before_whiten=norm).eval()
    f5 = torch.rand(3, backbone.channels["res5"], 4, 5)
    with torch.no_grad():
        d = head(None, lambda _x: f5).descriptor
    g = _gem(f5.double(), 3.0)
    if norm:
        g = g / g.norm(dim=1, keepdim=True)
    y = g @ head.whiten.weight.double().T + head.whiten.bias.double()
    assert torch.allclose(d.double(), y / y.norm(dim=1, keepdim=True), atol=1e-5)    # fp32 head vs fp64


def test_pca_initialisation_equals_the_whitening_formula(backbone):
    """After init_whiten_pca, the head's descriptor is L2((L2(g) - mu) P) with P = V / sqrt(lambda + s mean
    lambda) over the D' strongest directions, each direction up to its sign."""
    torch.manual_seed(1)
    c = backbone.channels["res5"]
    head = GeMHead(backbone, dim=6, learn_p=False).eval()
    f5 = torch.rand(40, c, 3, 3) ** 3
    g = _gem(f5.double(), 3.0)
    init_whiten_pca(head, g.float(), shrink=0.5)
    x = (g / g.norm(dim=1, keepdim=True)).numpy()
    mu = x.mean(0)
    lam, vec = np.linalg.eigh((x - mu).T @ (x - mu) / len(x))
    lam, vec = np.clip(lam[::-1][:6], 0, None), vec[:, ::-1][:, :6]
    proj = vec / np.sqrt(lam + 0.5 * lam.mean())        # the mean over the kept D' eigenvalues
    y = (x - mu) @ proj
    want = y / np.linalg.norm(y, axis=1, keepdims=True)
    with torch.no_grad():
        got = head(None, lambda _x: f5).descriptor.double().numpy()
    signs = np.sign((got * want).sum(0))
    assert np.allclose(got, want * signs, atol=1e-4)                                 # fp32 head vs fp64


def test_pca_initialisation_refusals(backbone):
    with pytest.raises(ValueError, match="no whitening FC"):
        init_whiten_pca(GeMHead(backbone), np.ones((4, backbone.channels["res5"])))
    with pytest.raises(ValueError, match="norm_before_whiten"):
        init_whiten_pca(GeMHead(backbone, dim=4, norm_before_whiten=False), np.ones((4, backbone.channels["res5"])))
