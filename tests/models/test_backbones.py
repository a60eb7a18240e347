import glob

import numpy as np
import pytest
import torch

from glimr.io.images import load_image
from glimr.models.backbones import (WeightsError, build_backbone, convert_lite_state_dict, lite_weights_file,
                                    load_checked)


def _imagenet_batch(shared_data, n=64, size=224):
    files = sorted(glob.glob(str(shared_data / "photos" / "*.JPEG")))  # one photo per class, in class order
    step = len(files) // n
    picks = list(range(0, len(files), step))[:n]
    xs = [torch.from_numpy(np.array(load_image(files[i]).resize((size, size)))).permute(2, 0, 1) for i in picks]
    return torch.stack(xs).float() / 255, torch.tensor(picks)


@pytest.mark.parametrize("name,min_acc", [("lite0", 0.70), ("lite2", 0.70)])
def test_packaged_lite_weights_classify_imagenet_photos(shared_data, name, min_acc):
    """The packaged ImageNet weights, mapped onto timm and normalised by the backbone itself, must classify
    real ImageNet photos: a wrong key map, layout or normalisation drops this to near chance."""
    import timm

    bb = build_backbone(name, weights="pretrained")
    net = timm.create_model(f"tf_efficientnet_{name}", pretrained=False)
    src = torch.load(lite_weights_file(name), map_location="cpu", weights_only=True)
    load_checked(net, convert_lite_state_dict(src, [len(b) for b in net.blocks]), name)
    net.eval()
    x, y = _imagenet_batch(shared_data)
    with torch.inference_mode():
        # same trunk as the Backbone: classifier on top of res5 (+global average pool)
        f5 = bb.eval().res5(bb.forward_res4(x))
        logits = net.classifier(f5.mean((2, 3)))
        ref = net(bb.normalize(x))
    assert torch.allclose(logits, ref, atol=1e-4)
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc >= min_acc, f"{name}: top-1 {acc:.2f} on real ImageNet photos"


def test_stage_shapes_and_channels():
    for name, c4, c5 in [("lite0", 112, 1280), ("lite2", 120, 1280), ("resnet50", 1024, 2048)]:
        bb = build_backbone(name, weights="none" if name.startswith("resnet") else "pretrained").eval()
        assert bb.channels == {"res4": c4, "res5": c5}
        with torch.inference_mode():
            out = bb(torch.rand(1, 3, 160, 224))
        assert out["res4"].shape == (1, c4, 10, 14)
        assert out["res5"].shape == (1, c5, 5, 7)


def test_expand_res5_input_keeps_the_function():
    for name in ("lite0", "resnet50"):
        bb = build_backbone(name, weights="none" if name == "resnet50" else "pretrained").eval()
        r4 = torch.rand(1, bb.channels["res4"], 8, 8)
        with torch.inference_mode():
            before = bb.res5(r4)
            bb.expand_res5_input(1)
            after = bb.res5(torch.cat([r4, torch.rand(1, 1, 8, 8)], 1))
        assert torch.allclose(before, after, atol=1e-5)


def test_weights_errors_are_clear():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="weights must be"):
        build_backbone("lite0", weights="imagenet21k")
    bb = build_backbone("lite0", weights="none")
    bad = {k: v for k, v in bb.state_dict().items()}
    bad.pop(next(iter(bad)))
    with pytest.raises(WeightsError, match="keys do not match"):
        load_checked(bb, bad, "x.pth")
