"""Checks every head must pass, on both backbone families (EfficientNet-Lite0 with its real ImageNet weights,
ResNet-50 random: its weights need a download): output shapes, a gradient for every parameter, deterministic
eval mode, the bf16 autocast path, the registry and checkpoints.

End to end on Lite0: every parameter of the whole net (stem to head) gets a gradient. On ResNet-50, to stay
fast on CPU, res4 is computed once (no grad) and each head trains from res4 through res5 and itself.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from glimr.models.backbones import Backbone, build_backbone
from glimr.models.registry import HEADS, available_models, build_model, head_class

SIZE = (64, 96)                        # res4: 4 x 6, res5: 2 x 3
HEAD_NAMES = ["gem", "glam", "cider", "ugalr", "dplg", "dolg"]
# name -> (stage of the map: "res4" | "res5", extra leading dims)
MAPS = {
    "gem": {},
    "glam": {"local_spatial": ("res5", ()), "global_spatial": ("res5", ())},
    "cider": {"A": ("res5", ()), "masks": ("res5", (2,))},
    "ugalr": {"G": ("res4", ()), "O": ("res4", ())},
    "dplg": {"A": ("res4", ())},
    "dolg": {"A": ("res4", ())},
}
DIMS = {"glam": 512, "ugalr": 512, "dplg": 512, "dolg": 512}   # the papers' 512-d descriptors


def test_all_heads_registered():
    assert set(HEAD_NAMES) <= set(HEADS)
    names = {m["name"] for m in available_models()}
    assert {f"{h}-{b}" for h in HEAD_NAMES for b in ("lite0", "resnet50")} <= names


@pytest.fixture(scope="module", params=[("lite0", "pretrained"), ("resnet50", "none")],
                ids=["lite0", "resnet50"])
def family(request):
    name, weights = request.param
    bb = build_backbone(name, weights=weights).eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        res4 = bb.forward_res4(x)
    return bb, x, res4, name == "lite0"


@pytest.mark.parametrize("head_name", HEAD_NAMES)
def test_shapes_gradients_and_determinism(family, head_name):
    base, x, res4, end_to_end = family
    bb = copy.deepcopy(base)
    torch.manual_seed(1)
    head = head_class(head_name)(bb)
    sizes = {"res4": tuple(res4.shape[-2:]), "res5": (SIZE[0] // 32, SIZE[1] // 32)}

    # training step: every parameter of the head and of res5 gets a finite, non-zero gradient
    head.train()
    bb.train()
    out = head(bb.forward_res4(x) if end_to_end else res4, bb.res5)
    loss = (out.descriptor * torch.randn_like(out.descriptor)).sum()
    for v in out.aux.values():                     # e.g. UGALR's intermediate supervision
        loss = loss + (v * torch.randn_like(v)).sum()
    loss.backward()
    trained = bb.named_parameters() if end_to_end else bb.res5.named_parameters(prefix="res5")
    for name, prm in list(head.named_parameters()) + list(trained):
        assert prm.grad is not None, f"{head_name}: no gradient reaches {name}"
        assert torch.isfinite(prm.grad).all() and prm.grad.abs().max() > 0, f"{head_name}: 0 grad: {name}"

    # eval: contract shapes and determinism
    head.eval()
    bb.eval()
    with torch.no_grad():
        o1 = head(res4, bb.res5)
        o2 = head(res4, bb.res5)
    assert o1.descriptor.shape == (2, head.dim) and o1.descriptor.dtype == torch.float32
    if head_name in DIMS:
        assert head.dim == DIMS[head_name]
    torch.testing.assert_close(o1.descriptor.norm(dim=1), torch.ones(2))
    assert set(o1.attention) == set(MAPS[head_name])
    for key, (stage, extra) in MAPS[head_name].items():
        assert o1.attention[key].shape == (2, *extra, *sizes[stage]), key
        assert torch.equal(o1.attention[key], o2.attention[key])
    assert o1.local is not None and o1.local.dim() == 4 and o1.local.shape[0] == 2
    assert o1.aux == {}                            # training-only outputs are not computed at search
    assert torch.equal(o1.descriptor, o2.descriptor)


def tiny_backbone() -> Backbone:
    """A real `Backbone` with tiny stages: cheap enough to run every head under bf16 autocast on CPU."""
    stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=16, padding=1), nn.ReLU())
    res5 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
    return Backbone("tiny", stem, res5, {"res4": 16, "res5": 32}, (0.5,) * 3, (0.5,) * 3, [(res5, "0")])


@pytest.mark.parametrize("head_name", HEAD_NAMES)
def test_bf16_autocast(head_name):
    torch.manual_seed(2)
    bb = tiny_backbone()
    head = head_class(head_name)(bb).eval()
    x = torch.rand(2, 3, 160, 192)
    with torch.no_grad():
        ref = head(bb.forward_res4(x), bb.res5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(bb.forward_res4(x), bb.res5)
    assert out.descriptor.dtype == torch.float32 and torch.isfinite(out.descriptor).all()
    cos = (out.descriptor * ref.descriptor).sum(dim=1)
    assert (cos > 0.99).all(), cos
    for key, m in out.attention.items():
        assert torch.isfinite(m).all(), key


@pytest.mark.parametrize("head_name", ["ugalr"])          # the one that changes the backbone
def test_build_model_and_checkpoint_roundtrip(head_name, tmp_path):
    from glimr.models.checkpoint import load_model, save_model

    net = build_model(f"{head_name}-lite0", weights="none")
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        d1 = net(x).descriptor
    save_model(net, tmp_path / "m")
    net2 = load_model(tmp_path / "m")
    with torch.no_grad():
        d2 = net2(x).descriptor
    torch.testing.assert_close(d1, d2)
    assert net2.backbone.channels.get("res5_in", net2.backbone.channels["res4"]) == \
        net.backbone.channels.get("res5_in", net.backbone.channels["res4"])


# The GeM exponent: fixed at p = 3 where the paper fixes it (DPLG Sec. 3, UGALR Sec. 4), learned where the paper
# learns it (GLAM Sec. 3.4: "a learnable spatial pooling"; GeM's authors) or does not say (CiDeR, DOLG).
FIXED_P = {"gem": False, "glam": False, "cider": False, "ugalr": True, "dplg": True, "dolg": False}


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_gem_exponent_fixed_where_the_paper_fixes_it(name):
    bb = build_backbone("lite0", weights="none")
    head = head_class(name)(bb)
    p_params = [n for n, _ in head.named_parameters() if n == "p" or n.endswith(".p")]
    assert (not p_params) == FIXED_P[name], p_params
    pools = [m for m in head.modules() if type(m).__name__ == "GeM"]
    assert pools and all(float(m.p) == 3.0 for m in pools)      # exact: the default value, untrained
    if FIXED_P[name]:
        learned = head_class(name)(build_backbone("lite0", weights="none"), learn_p=True)
        assert any(n.endswith(".p") for n, _ in learned.named_parameters())
