"""Trained models shipped inside glimr: weights under glimr/models/weights/ (safetensors + JSON config).

A packaged model has its own name (e.g. `cider-lite0-composites`): it is an architecture from the registry
(HEAD-BACKBONE, the `name` in its JSON config) with trained weights. Head-only checkpoints hold just the
trained part ("partial" in the JSON); the rest comes from the packaged pretrained backbone, so the model
works offline. Each has a model card in glimr/models/weights/MODEL_CARD.md (data, command, time, metrics).

    from glimr.models.packaged import load_packaged, packaged_models
    net = load_packaged("cider-lite0-composites")
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name: (file stem under WEIGHTS_DIR, one-line description)
PACKAGED: dict[str, tuple[str, str]] = {
    "cider-lite0-composites": (
        "cider-lite0-composites",
        "CiDeR-FT head (box-supervised attentional localization, GeM, FC 512) trained on instance composites of "
        "1,000 photos, on the packaged frozen EfficientNet-Lite0; offline"),
    "cider-lite0-composites-pcaw": (
        "cider-lite0-composites-pcaw",
        "cider-lite0-composites + PCA-whitening learned on its 4,000 training views; queries over the scale "
        "pyramid 1, 0.7071, 0.5 (the default until it lost to the off-the-shelf backbone on real photos)"),
    "gem-lite2-realw": (
        "gem-lite2-realw",
        "GeM on the packaged ImageNet EfficientNet-Lite2 + PCA-whitening learned on 1,279 real photos (photos/, "
        "train-real/) at longest side 512; no trained head (the default until gem-lite2-realw768)"),
    "gem-lite2-realw768": (
        "gem-lite2-realw768",
        "gem-lite2-realw with its whitening learned at longest side 768, the size it runs at; no trained head; "
        "glimr's default (best measured on the real sets)"),
}


def register_packaged(name: str, stem: str, about: str) -> None:
    PACKAGED[name] = (stem, about)


def is_packaged(name: str) -> bool:
    return name in PACKAGED


def packaged_checkpoint(name: str) -> Path:
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; packaged: {sorted(PACKAGED)}")
    return WEIGHTS_DIR / f"{PACKAGED[name][0]}.safetensors"


def load_packaged(name: str):
    """The packaged model as a RetrievalNet in eval mode, named `name`."""
    from glimr.models.checkpoint import CheckpointError, load_model

    path = packaged_checkpoint(name)
    if not path.is_file():
        raise CheckpointError(f"the weights of packaged model {name!r} are missing ('{path}'): "
                              "reinstall glimr")
    net = load_model(path)
    net.name = name
    net.config["packaged"] = name
    return net


def packaged_models() -> list[dict]:
    """[{name, architecture, about, checkpoint}] for `glimr models`."""
    from glimr.models.checkpoint import config_path, read_config

    out = []
    for name, (stem, about) in PACKAGED.items():
        js = config_path(WEIGHTS_DIR / f"{stem}.safetensors")
        arch = read_config(js)["name"] if js.is_file() else None
        out.append({"name": name, "architecture": arch, "about": about,
                    "checkpoint": str(WEIGHTS_DIR / f"{stem}.safetensors")})
    return out
