"""Helpers shared by the model tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn


def randomize_batchnorms(net: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm2d statistics and affine terms far from the identity (fresh layers have mean 0, var 1,
    weight 1, bias 0), so that a test of what the BatchNorms do, or of folding them away, can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)


@pytest.fixture
def randomize_bn():
    """`randomize_batchnorms(net, seed=0)`."""
    return randomize_batchnorms
