"""BatchNorm folding for inference (glimr/models/fold.py): the folded copy computes the same descriptors and
local maps as the net, has no BatchNorm left in its backbone (and in the heads only those after functional
convolutions), and is rebuilt when the net changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from glimr.extract.multiscale import FOLD_MIN_VIEWS, extract
from glimr.models.fold import fold_batchnorm, inference_model
from glimr.models.registry import build_model

HEADS = ["gem", "glam", "cider", "ugalr", "dplg", "dolg"]


def backbone_batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.backbone.modules())


@pytest.mark.parametrize("backbone,expected", [("lite0", 49), ("resnet50", 53)])
def test_every_backbone_batchnorm_is_folded(backbone, expected, randomize_bn):
    torch.manual_seed(0)
    net = build_model(f"gem-{backbone}", weights="none").eval()
    randomize_bn(net)
    n_before = backbone_batchnorms(net)
    folded, n = fold_batchnorm(net)
    assert n == n_before == expected                 # every conv -> BN pair of both families
    assert backbone_batchnorms(folded) == 0
    assert backbone_batchnorms(net) == n_before      # the net itself is untouched
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = net(x), folded(x)
    # float32 rounding through ~50 layers whose BatchNorms are random (not trained) grows to about 1e-4 of the
    # map's scale; a wrong fold is off by the order of the map itself
    np.testing.assert_allclose(b.descriptor.numpy(), a.descriptor.numpy(), atol=1e-5)
    np.testing.assert_allclose(b.local.numpy(), a.local.numpy(), atol=1e-3 * float(a.local.abs().max()))


# heads with their variants that bring other conv-BN blocks (timm's NL block, SE, gather-excite, SK)
VARIANTS = [(h, {}) for h in HEADS] + [("cider", {"enhancement": e}) for e in ("nonlocal", "se", "ge")] + [
    ("cider", {"context": "sk"})]
# BatchNorm2d that stay: after a functional convolution (DPLG's fusing 1x1 conv)
LEFT = {"dplg": 1}


@pytest.mark.parametrize("head,kwargs", VARIANTS, ids=[f"{h}-{'-'.join(map(str, k.values())) or 'default'}"
                                                        for h, k in VARIANTS])
def test_folded_heads_match_on_lite0(head, kwargs, randomize_bn):
    """Every head (UGALR with its widened res5 input among them) keeps its outputs; its own conv-BN blocks are
    folded too."""
    torch.manual_seed(0)
    net = build_model(f"{head}-lite0", weights="none", **kwargs).eval().double()   # float64: no rounding to blur
    randomize_bn(net, seed=1)
    n_head_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.head.modules())
    folded, n = fold_batchnorm(net)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.head.modules())
    assert left == LEFT.get(head, 0)
    assert n == 49 + n_head_bn - left
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        a, b = net(x), folded(x)
    np.testing.assert_allclose(b.descriptor.numpy(), a.descriptor.numpy(), atol=1e-10)
    np.testing.assert_allclose(b.local.numpy(), a.local.numpy(), atol=1e-9 * float(a.local.abs().max()))
    for k in a.attention:
        np.testing.assert_allclose(b.attention[k].numpy(), a.attention[k].numpy(), atol=1e-9)


def test_extract_with_folding_matches_the_plain_net(default_model, shared_data, monkeypatch):
    """The real default model on real photos: extract() (folded) against the same net unfolded."""
    files = sorted((shared_data / "photos").glob("*.JPEG"))[:FOLD_MIN_VIEWS]
    assert len(files) == FOLD_MIN_VIEWS                                # enough views for extract() to fold
    folded = extract(default_model, files, max_size=256, progress=False, workers=0, precision="fp32").descriptors
    assert inference_model(default_model, build=False) is not default_model   # the folded copy ran
    monkeypatch.setenv("GLIMR_FOLD_BN", "0")
    plain = extract(default_model, files, max_size=256, progress=False, workers=0, precision="fp32").descriptors
    np.testing.assert_allclose(folded, plain, atol=1e-5)
    assert (folded * plain).sum(axis=1).min() > 1 - 1e-6


def test_inference_model_is_cached_and_rebuilt_when_the_net_changes(monkeypatch, randomize_bn):
    net = build_model("gem-lite0", weights="none").eval()
    randomize_bn(net)
    assert inference_model(net, build=False) is net                      # nothing to reuse yet
    first = inference_model(net)
    assert first is not net and inference_model(net) is first          # cached
    assert inference_model(net, build=False) is first                  # reused
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = first(x).descriptor
        next(net.backbone.parameters()).mul_(0.5)                       # an in-place change, as an optimizer's
        second = inference_model(net)
        assert second is not first
        np.testing.assert_allclose(second(x).descriptor.numpy(), net(x).descriptor.numpy(), atol=1e-5)
        assert not torch.allclose(before, second(x).descriptor)
    net.train()
    assert inference_model(net) is net                                  # training mode: batch statistics
    net.eval()
    monkeypatch.setenv("GLIMR_FOLD_BN", "0")
    assert inference_model(net) is net


def test_a_small_extract_call_does_not_make_a_copy(shared_data, randomize_bn):
    """One query image: making the folded copy would cost more than it saves, so extract() runs the net."""
    net = build_model("gem-lite0", weights="none").eval()
    randomize_bn(net)
    one = sorted((shared_data / "photos").glob("*.JPEG"))[:1]
    extract(net, one, max_size=128, progress=False, workers=0, precision="fp32")
    assert inference_model(net, build=False) is net
    extract(net, one * FOLD_MIN_VIEWS, max_size=128, progress=False, workers=0, precision="fp32")
    assert inference_model(net, build=False) is not net
