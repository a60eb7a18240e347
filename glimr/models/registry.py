"""Model registry: a model name is `HEAD-BACKBONE` (e.g. `gem-lite0`, `glam-resnet50`), or the name of a
trained model packaged with glimr (glimr/models/packaged.py, e.g. `cider-lite0-composites`).

Adding a method = its head file, its test, and one line in HEADS.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

from glimr.models.backbones import SPECS as BACKBONES
from glimr.models.backbones import build_backbone
from glimr.models.net import RetrievalNet
from glimr.models.packaged import PACKAGED, is_packaged, load_packaged, packaged_checkpoint

HEADS: dict[str, tuple[str, str]] = {
    # name: (module:class, one-line description)
    "gem": ("glimr.models.heads.gem:GeMHead", "GeM baseline: GeM pooling (+ optional whitening FC), L2"),
    "glam": ("glimr.models.heads.glam:GLAMHead", "GLAM: local/global spatial/channel attention, GeM, FC 512"),
    "cider": ("glimr.models.heads.cider:CiDeRHead", "CiDeR: attentional localization masks, GeM"),
    "ugalr": ("glimr.models.heads.ugalr:UGALRHead", "UGALR: LALM on res4, O into res5, GeM, FC 512"),
    "dplg": ("glimr.models.heads.dplg:DPLGHead", "DPLG: RFB + dot-product attention on res4, FC 512"),
    "dolg": ("glimr.models.heads.dolg:DOLGHead", "DOLG: multi-atrous local, orthogonal fusion, FC 512"),
}

DEFAULT_MODEL = "gem-lite2-realw768"  # packaged, chosen on the real sets: glimr/models/weights/MODEL_CARD.md


def split_name(name: str) -> tuple[str, str]:
    """(head, backbone) of a model name; a packaged model answers with its architecture's."""
    if is_packaged(name):
        from glimr.models.checkpoint import config_path, read_config

        return split_name(read_config(config_path(packaged_checkpoint(name)))["name"])
    head, _, bb = name.partition("-")
    if head not in HEADS or bb not in BACKBONES:
        raise ValueError(f"unknown model {name!r}: a model is HEAD-BACKBONE with HEAD in {sorted(HEADS)} "
                         f"and BACKBONE in {sorted(BACKBONES)} (see `glimr models`)")
    return head, bb


def head_class(head: str):
    mod, _, cls = HEADS[head][0].partition(":")
    return getattr(importlib.import_module(mod), cls)


#: heads whose default build has no weights to learn beyond GeM's p (initialised at the papers' p = 3): with
#: the ImageNet backbone they are a real off-the-shelf model, not a random one
OFF_THE_SHELF_HEADS = frozenset({"gem"})


class UntrainedHeadWarning(UserWarning):
    """A model built by HEAD-BACKBONE name whose head has randomly initialised weights."""


def weights_status(name: str, head_kwargs: dict | None = None) -> str:
    """"trained" (a packaged model), "off-the-shelf" (ImageNet backbone + a head with nothing to learn, e.g.
    GeM without a whitening FC) or "untrained" (a head whose layers start from random weights: train it)."""
    if is_packaged(name):
        return "trained"
    head, _ = split_name(name)
    if head in OFF_THE_SHELF_HEADS and not (head_kwargs or {}).get("dim"):
        return "off-the-shelf"
    return "untrained"


def available_models() -> list[dict]:
    rows = [{"name": f"{h}-{b}", "head": h, "backbone": b, "weights": weights_status(f"{h}-{b}"),
             "about": HEADS[h][1]} for h in HEADS for b in BACKBONES]
    for name, (_, about) in PACKAGED.items():
        h, b = split_name(name)
        rows.append({"name": name, "head": h, "backbone": b, "weights": "trained", "about": "trained: " + about})
    return rows


def build_model(name: str = DEFAULT_MODEL, checkpoint: str | Path | None = None, weights: str = "pretrained",
                *, warn_untrained: bool = True, **head_kwargs) -> RetrievalNet:
    """Build a model by name; with `checkpoint`, its JSON config (next to the .safetensors file) decides
    the name and head arguments, and its weights are loaded (the backbone starts random: the checkpoint
    holds it). A head with random weights (:func:`weights_status` "untrained") is marked
    ``config["untrained_head"]`` and warned about, unless ``warn_untrained`` is False (the checkpoint loader
    and the trainer, which fill or train those weights)."""
    if checkpoint is not None:
        from glimr.models.checkpoint import load_model
        return load_model(checkpoint)
    if is_packaged(name):
        if head_kwargs or weights != "pretrained":
            raise ValueError(f"{name!r} is a trained model packaged with glimr: it takes no head arguments and "
                             "no --weights (build its architecture by HEAD-BACKBONE name for that)")
        return load_packaged(name)
    head, bb = split_name(name)
    backbone = build_backbone(bb, weights=weights)
    net = RetrievalNet(backbone, head_class(head)(backbone, **head_kwargs), name,
                       {"name": name, "head_kwargs": head_kwargs})
    if warn_untrained and weights_status(name, head_kwargs) == "untrained":
        net.config["untrained_head"] = True
        warnings.warn(f"model {name!r}: the {head} head has no trained weights, so its descriptors come from "
                      "random head weights (fine for tests and training, meaningless for search); train it "
                      "(`glimr train`) and pass --checkpoint, or use a trained model (`glimr models`)",
                      UntrainedHeadWarning, stacklevel=2)
    return net.eval()


def model_max_size_of(name: str = DEFAULT_MODEL, checkpoint: str | Path | None = None) -> int:
    """The longest image side model ``name`` (or ``checkpoint``) runs at unless told otherwise, read from its
    JSON config without building it (glimr.extract.multiscale.model_max_size; 512 for a model without one)."""
    from glimr.extract.multiscale import model_max_size
    from glimr.models.checkpoint import config_path, read_config

    if checkpoint is not None:
        return model_max_size(read_config(config_path(checkpoint)))
    if is_packaged(name):
        return model_max_size(read_config(config_path(packaged_checkpoint(name))))
    return model_max_size(None)


def describe(name: str) -> str:
    head, bb = split_name(name)
    about = PACKAGED[name][1] if is_packaged(name) else HEADS[head][1]
    return json.dumps({"name": name, "head": head, "backbone": bb, "about": about})
