"""`glimr train`: train any head (and optionally the backbone) of a glimr model with ArcFace.

    from glimr.train.trainer import load_config, train
    cfg = load_config("configs/train_glam_lite0_composites.yaml", ["optim.epochs=2"])
    summary = train(cfg)                 # or train(cfg, resume=True)

What a run does (the paper settings are the defaults where they fit; each is a config key):
- data: instance composites from a photo folder (`data.kind: composites`), real views of real photos with
  no pasting (`views`: each photo a class seen through glimr.data.transforms.real_view, plus `data.groups`,
  folders of one place at different times, e.g. webcams; glimr.data.views), a CSV of (image path, label)
  (`csv`) or GLDv2's train.csv / train_clean.csv (`gldv2`); GLAM's group-size batches (`data.n_groups`
  aspect-ratio groups, longest side `data.long_side`) drawn in random or class-balanced order
  (`data.sampler: random | class_balanced`, `data.per_class`), or one square size for every image
  (`data.size_mode: square`, long_side x long_side: UGALR's and the co-attention paper's 512 x 512).
- frozen-backbone mode (CiDeR-FT style, `cache.enabled: true`): the backbone up to `cache.stage` is frozen and
  its feature maps are cached on disk once (glimr.train.cache); stage res5 trains the head only, stage res4
  trains res5 + head. Otherwise `optim.trainable: all | res5+head | head` picks what trains on images.
- loss: ArcFace on the global descriptor (`loss.margin`, `loss.scale`; GLAM m=0.3, UGALR/DPLG m=0.15 s=30),
  plus lambda x cross-entropy on UGALR's intermediate embedding (`loss.inter_weight`, 0.6), or the GeM
  paper's contrastive loss (`loss.kind: contrastive`).
- SGD with momentum and weight decay, linear warm-up (`optim.warmup_steps`, or `optim.warmup_epochs`) then
  cosine decay (per optimizer step), gradient accumulation (`optim.accum_steps`), gradient clipping; the batch
  is per process (`optim.batch_size`) or a paper's total (`optim.global_batch_size`, split over the GPUs and
  accumulation steps); AMP on CUDA (bf16 where supported, else fp16 with
  a grad scaler), bf16 autocast on CPUs with native bf16 (else fp32): `run.precision: auto`.
- multi-GPU: launch with `torchrun --nproc_per_node N -m glimr.cli train CONFIG`: DistributedDataParallel,
  each rank takes every N-th batch; rank 0 logs and writes checkpoints.
- checkpoints (safetensors + JSON, written atomically) every `run.save_every` optimizer steps and at every
  epoch end, in OUT/checkpoints/step-XXXXXXX/ with the full config (config.yaml) next to them;
  `resume=True` continues from OUT/checkpoints/latest.json with the same model, optimizer, schedule,
  data order and random state (the views are a pure function of (seed, epoch, index)).
- the trained model: OUT/model.safetensors + OUT/model.json (+ OUT/config.yaml), loadable with
  `build_model(checkpoint=...)`; only the trained parts are saved when the backbone (or its stem) was
  frozen ("head-only" checkpoints on top of the packaged pretrained backbone).
- progress bars, and OUT/log.jsonl: one JSON line per `run.log_every` steps with loss (and its parts),
  learning rate, images/s, epoch and step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from glimr.config import (
    check_number,
    finite_float,
    float_in,
    int_in,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from glimr.data import transforms as T
from glimr.data.samplers import ClassBalanced, GroupSizeBatchSampler, RandomOrder
from glimr.io.atomic import atomic_write_bytes
from glimr.models.checkpoint import save_model
from glimr.models.precision import resolve_precision
from glimr.train.losses import Criterion


class TrainConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    kind: str = "composites"                  # composites | views | csv | gldv2
    photos: str | list | None = None          # composites: folder of photos (one class per photo); views:
                                              # folders and/or files (one class per photo)
    groups: str | None = None                 # views: folder of place sub-folders (one class each)
    warp: float = 0.15                        # views: perspective strength of a generated view
    csv: str | None = None                    # csv / gldv2: the CSV file
    root: str | None = None                   # csv / gldv2: image folder (csv default: the CSV's folder)
    long_side: int = 384                      # group sizes: longest side of a batch's images
    size_mode: str = "group"                  # group: aspect-ratio group sizes; square: long_side x long_side
    n_groups: int = 3                         # aspect-ratio groups (GLAM group-size sampling)
    sampler: str = "random"                   # random | class_balanced
    per_class: int = 4                        # class_balanced: samples per class and epoch
    views_per_class: int = 1                  # composites: views per class and epoch (image mode)
    clean_first: int = 0                      # composites: the first views of each class are clean crops
    p_clean: float = 0.25                     # composites: probability of a clean view
    paste_scale: list = field(default_factory=lambda: [0.25, 0.7])
    crop_area: list = field(default_factory=lambda: [0.35, 1.0])
    crop_ratio: list = field(default_factory=lambda: [0.75, 1.3333333333333333])
    bg_area: list = field(default_factory=lambda: [0.5, 1.0])
    illumination: float = 0.3
    hflip: float = 0.5
    seed: int = 0


@dataclass
class CacheConfig:
    enabled: bool = False
    dir: str | None = None                    # default: OUT/cache
    stage: str = "res5"                       # res5: head only trains; res4: res5 + head train
    keep_res4: bool = True                    # stage res5: also keep res4 (heads that read it: DPLG, DOLG)
    views_per_class: int = 4                  # composites: fixed views per class in the cache
    dtype: str = "float16"
    flip: float = 0.5                         # feature-map horizontal flips at training time
    batch_size: int = 16                      # backbone batch while building


@dataclass
class LossConfig:
    kind: str = "arcface"                     # arcface | contrastive
    margin: float = 0.3                       # ArcFace m (GLAM 0.3; UGALR, DPLG 0.15)
    scale: float = 30.0                       # ArcFace s
    easy_margin: bool = False
    contrastive_margin: float = 0.7
    inter_weight: float = 0.6                 # UGALR lambda
    loc_weight: float = 0.0                   # composites: supervise an attention map with the pasted box
    loc_map: str = "A"                        # which attention map (CiDeR "A", GLAM "local_spatial", ...)


@dataclass
class OptimConfig:
    trainable: str = "all"                    # image mode: all | res5+head | head (cache: from cache.stage)
    epochs: int = 10
    max_steps: int | None = None              # stop after this many optimizer steps (total)
    batch_size: int = 64                      # per process (per GPU under torchrun)
    global_batch_size: int | None = None      # if set: the batch over all processes and accumulation steps
                                              # (a paper's "batch size"); per process = this / (world x accum)
    accum_steps: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-5                # GLAM: SGD lr 1e-3, momentum 0.9, weight decay 1e-5
    warmup_steps: int = 100
    warmup_epochs: float | None = None        # if set: warm-up length in epochs (replaces warmup_steps)
    min_lr_ratio: float = 0.0                 # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = None
    freeze_bn: bool = True                    # BatchNorm of trained backbone stages keeps its statistics
    classifier_lr_mult: float = 1.0           # learning-rate factor of the ArcFace / CE classifiers
    init_whiten: str = "none"                 # none | pca: GeM head's whitening FC starts as the PCA-whitening
                                              # of the training items' GeM vectors (GeM paper; needs the cache)
    init_shrink: float = 0.5                  # init_whiten=pca: eigenvalue shrinkage (glimr.models.whiten)


@dataclass
class RunConfig:
    out: str = "runs/train"
    device: str = "auto"                      # auto | cpu | cuda | cuda:1
    precision: str = "auto"                   # auto | fp32 | bf16 | fp16 (fp16: CUDA only)
    workers: int = 2
    save_every: int = 500                     # optimizer steps between checkpoints (and every epoch end)
    keep: int = 2                             # checkpoints kept
    log_every: int = 10
    seed: int = 0
    threads: int | None = None                # torch CPU threads (default: torch's)
    progress: bool = True


@dataclass
class TrainConfig:
    model: str = "glam-lite0"
    head_kwargs: dict = field(default_factory=dict)
    weights: str = "pretrained"
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "cache": CacheConfig, "loss": LossConfig, "optim": OptimConfig,
             "run": RunConfig}
# keys that may differ between a run and its resumption
RESUMABLE_CHANGES = {("run", k) for k in ("device", "workers", "save_every", "keep", "log_every", "threads",
                                          "progress")} | {("optim", "max_steps"), ("optim", "epochs")}


def config_from_dict(d: dict, source: str = "<config>") -> TrainConfig:
    d = dict(d or {})
    unknown = set(d) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TrainConfigError(f"{source}: unknown top-level keys {sorted(unknown)}; known: model, "
                               f"head_kwargs, weights, {', '.join(_SECTIONS)}")
    kw = {}
    for k, v in d.items():
        if k in _SECTIONS:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise TrainConfigError(f"{source}: '{k}' must be a mapping")
            names = {f.name for f in dataclasses.fields(_SECTIONS[k])}
            bad = set(v) - names
            if bad:
                raise TrainConfigError(f"{source}: unknown keys in '{k}': {sorted(bad)}; "
                                       f"known: {sorted(names)}")
            kw[k] = _SECTIONS[k](**v)
        else:
            kw[k] = v if k != "head_kwargs" else dict(v or {})
    return TrainConfig(**kw)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`section.key=value` (value parsed as YAML: numbers, lists [0.2, 0.5], true/false, null)."""
    d = copy.deepcopy(d)
    for o in overrides or []:
        key, eq, val = o.partition("=")
        if not eq or not key:
            raise TrainConfigError(f"bad override {o!r}: use key=value, e.g. optim.lr=0.01 or "
                                   "model=gem-lite0")
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"bad override {o!r}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(val)
    return d


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    d = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config '{p}' not found (see configs/ for examples)")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"'{p}' is not valid YAML: {e}") from e
    cfg = config_from_dict(apply_overrides(d, overrides or []), str(path))
    validate(cfg)
    return cfg


# numeric keys: (kind, optional) checked by validate() with glimr.config's types (finite, in range)
_NUMBERS = {
    "data": {"long_side": int_in(16), "n_groups": positive_int, "per_class": positive_int,
             "views_per_class": positive_int, "clean_first": nonnegative_int, "p_clean": float_in(0.0, 1.0),
             "illumination": float_in(0.0, 1.0), "warp": float_in(0.0, 0.5), "hflip": float_in(0.0, 1.0),
             "seed": int_in()},
    "cache": {"views_per_class": positive_int, "flip": float_in(0.0, 1.0), "batch_size": positive_int},
    "loss": {"margin": finite_float, "scale": positive_float, "contrastive_margin": finite_float,
             "inter_weight": nonnegative_float, "loc_weight": nonnegative_float},
    "optim": {"epochs": positive_int, "max_steps": (positive_int, True), "batch_size": positive_int,
              "global_batch_size": (positive_int, True), "warmup_epochs": (nonnegative_float, True),
              "accum_steps": positive_int, "lr": positive_float, "momentum": float_in(0.0, 1.0, hi_open=True),
              "weight_decay": nonnegative_float, "warmup_steps": nonnegative_int,
              "min_lr_ratio": float_in(0.0, 1.0), "init_shrink": nonnegative_float, "grad_clip": (positive_float, True),
              "classifier_lr_mult": positive_float},
    "run": {"workers": nonnegative_int, "save_every": positive_int, "keep": positive_int,
            "log_every": positive_int, "seed": int_in(), "threads": (positive_int, True)},
}
_PAIRS = {"paste_scale": (0.0, 1.0), "crop_area": (0.0, 1.0), "crop_ratio": (0.0, None), "bg_area": (0.0, 1.0)}


def _validate_values(cfg: TrainConfig) -> None:
    """Types and ranges of every numeric and boolean setting (a config file or a key=value override may hold
    anything YAML can say: strings, NaN, negative counts); numbers are stored back with their type."""
    for sec, rules in _NUMBERS.items():
        obj = getattr(cfg, sec)
        for key, rule in rules.items():
            kind, optional = rule if isinstance(rule, tuple) else (rule, False)
            try:
                setattr(obj, key, check_number(f"{sec}.{key}", getattr(obj, key), kind, optional=optional))
            except ValueError as e:
                raise TrainConfigError(str(e)) from None
    for sec in _SECTIONS:
        obj = getattr(cfg, sec)
        for f in dataclasses.fields(obj):
            if f.type in ("bool", bool) and not isinstance(getattr(obj, f.name), bool):
                raise TrainConfigError(f"{sec}.{f.name} must be true or false, not {getattr(obj, f.name)!r}")
    for key, (lo, hi) in _PAIRS.items():
        v = getattr(cfg.data, key)
        kind = float_in(lo, hi, lo_open=True)
        if not isinstance(v, list | tuple) or len(v) != 2:
            raise TrainConfigError(f"data.{key} must be a pair [low, high], not {v!r}")
        lo_v, hi_v = (check_number(f"data.{key}", x, kind) for x in v)
        if lo_v > hi_v:
            raise TrainConfigError(f"data.{key} must be [low, high] with low <= high, not {v!r}")
        setattr(cfg.data, key, [lo_v, hi_v])
    if not isinstance(cfg.head_kwargs, dict):
        raise TrainConfigError(f"head_kwargs must be a mapping, not {cfg.head_kwargs!r}")


def validate(cfg: TrainConfig) -> None:
    try:
        _validate_values(cfg)
    except ValueError as e:
        raise TrainConfigError(str(e)) from None
    if cfg.data.kind not in ("composites", "views", "csv", "gldv2"):
        raise TrainConfigError(f"data.kind must be composites, views, csv or gldv2, not {cfg.data.kind!r}")
    if cfg.data.kind in ("composites", "views") and not cfg.data.photos:
        raise TrainConfigError(f"data.photos (a folder of photos) is needed for data.kind={cfg.data.kind}")
    if cfg.data.kind != "views" and cfg.data.groups:
        raise TrainConfigError("data.groups is read by data.kind=views only")
    if cfg.data.kind in ("csv", "gldv2") and not cfg.data.csv:
        raise TrainConfigError(f"data.csv is needed for data.kind={cfg.data.kind}")
    if cfg.data.kind == "gldv2" and not cfg.data.root:
        raise TrainConfigError("data.root (the GLDv2 train image folder) is needed for data.kind=gldv2")
    if cfg.loss.loc_weight > 0 and cfg.data.kind != "composites":
        raise TrainConfigError("loss.loc_weight needs the boxes of instance composites "
                               "(data.kind=composites)")
    if cfg.optim.init_whiten not in ("none", "pca"):
        raise TrainConfigError(f"optim.init_whiten must be none or pca, not {cfg.optim.init_whiten!r}")
    if cfg.optim.init_whiten == "pca" and not (cfg.cache.enabled and cfg.cache.stage == "res5"
                                                and cfg.model.startswith("gem-")):
        raise TrainConfigError("optim.init_whiten=pca initialises a GeM head's whitening FC from the cached res5 "
                               "maps: it needs a gem-* model, cache.enabled=true and cache.stage=res5")
    if cfg.data.size_mode not in ("group", "square"):
        raise TrainConfigError(f"data.size_mode must be group or square, not {cfg.data.size_mode!r}")
    if cfg.data.size_mode == "square" and cfg.cache.enabled:
        raise TrainConfigError("data.size_mode=square resizes images, but the feature cache (cache.enabled) "
                               "keeps the group sizes: use data.size_mode=group with the cache")
    if cfg.data.sampler not in ("random", "class_balanced"):
        raise TrainConfigError(f"data.sampler must be random or class_balanced, not {cfg.data.sampler!r}")
    if cfg.optim.trainable not in ("all", "res5+head", "head"):
        raise TrainConfigError(f"optim.trainable must be all, res5+head or head, not {cfg.optim.trainable!r}")
    if cfg.cache.stage not in ("res4", "res5"):
        raise TrainConfigError(f"cache.stage must be res4 or res5, not {cfg.cache.stage!r}")
    if cfg.run.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise TrainConfigError(f"run.precision must be auto, fp32, bf16 or fp16, not {cfg.run.precision!r}")
    if cfg.optim.batch_size < 1 or cfg.optim.accum_steps < 1:
        raise TrainConfigError("optim.batch_size and optim.accum_steps must be >= 1")


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------- helpers
def lr_at(step: int, total: int, cfg: OptimConfig, warmup_steps: int | None = None) -> float:
    """Linear warm-up over `warmup_steps` (default cfg.warmup_steps), then cosine decay to lr * min_lr_ratio
    at `total` steps."""
    base = cfg.lr
    warm = cfg.warmup_steps if warmup_steps is None else int(warmup_steps)
    if warm > 0 and step < warm:
        return base * (step + 1) / warm
    span = max(1, total - warm)
    t = min(1.0, (step - warm) / span)
    return base * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def per_process_batch(cfg: OptimConfig, world_size: int) -> int:
    """The batch of one process: optim.batch_size, or optim.global_batch_size / (world size x accum_steps)
    when that is set (a paper's batch size, the same whatever the number of GPUs)."""
    if cfg.global_batch_size is None:
        return cfg.batch_size
    share = int(world_size) * cfg.accum_steps
    if cfg.global_batch_size % share:
        raise TrainConfigError(f"optim.global_batch_size={cfg.global_batch_size} is not divisible by world size "
                               f"{world_size} x optim.accum_steps {cfg.accum_steps}: choose a number of GPUs "
                               "(torchrun --nproc_per_node) and accum_steps whose product divides it")
    return cfg.global_batch_size // share


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> None:
    """No gradients, and eval mode for good (BatchNorm statistics fixed, dropout off)."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.train = _frozen_train.__get__(module, type(module))
    nn.Module.train(module, False)


def freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = _frozen_train.__get__(m, type(m))
            nn.Module.train(m, False)


def trained_prefixes(trainable: str) -> list[str] | None:
    """State-dict prefixes a trained model differs in from its pretrained start (None: everything)."""
    return {"head": ["head."], "res5+head": ["head.", "backbone.res5."], "all": None}[trainable]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def amp_context(precision: str, device: torch.device):
    """(autocast context factory, needs a grad scaler)."""
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return (lambda: torch.autocast("cuda", dtype=torch.float16)), True
        if precision in ("auto", "bf16"):
            return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), False
        return contextlib.nullcontext, False
    if precision == "fp16":
        raise TrainConfigError("run.precision=fp16 needs CUDA; use auto or bf16 on a CPU")
    if resolve_precision("auto" if precision == "auto" else precision, device) == "bf16":
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), False
    return contextlib.nullcontext, False


def _collate(items: list[dict]) -> dict:
    out = {"label": torch.tensor([it["label"] for it in items], dtype=torch.long),
           "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
    for k in ("image", "res4", "res5", "box"):
        if k in items[0] and items[0][k] is not None:
            out[k] = torch.stack([it[k] for it in items])
    return out


class CachedMaps(Dataset):
    """Items of a FeatureCache as training samples, with feature-level horizontal flips."""

    def __init__(self, cache, flip: float = 0.5, seed: int = 0):
        self.cache, self.flip, self.seed, self.epoch = cache, float(flip), int(seed), 0

    def __len__(self):
        return len(self.cache)

    @property
    def labels(self):
        return self.cache.labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, key):
        i = int(key[0]) if isinstance(key, (tuple, list)) else int(key)
        flip = self.flip > 0 and T.sample_rng(self.seed, self.epoch, i, salt=7).random() < self.flip
        out = {"label": int(self.cache.labels[i]), "index": i}
        for k in self.cache.keys:
            m = self.cache.get(k, [i])[0]
            out[k] = m.flip(-1) if flip else m
        if self.cache.boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in self.cache.boxes[i])
            out["box"] = torch.tensor([1 - x1, y0, 1 - x0, y1] if flip else [x0, y0, x1, y1])
        return out


class TrainStep(nn.Module):
    """net + criterion in one module (what DDP wraps): forward(batch) -> (loss, parts)."""

    def __init__(self, net: nn.Module, criterion: Criterion, stage: str | None):
        super().__init__()
        self.net, self.criterion, self.stage = net, criterion, stage

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        from glimr.train.cache import head_forward

        if self.stage is None:
            x = batch["image"].float().div_(255.0).contiguous(memory_format=torch.channels_last)
            out = self.net(x)
        else:
            out = head_forward(self.net, {k: batch[k] for k in ("res4", "res5") if k in batch}, self.stage)
        return self.criterion(out, batch["label"], batch.get("box"))


# ---------------------------------------------------------------------------------------------- state i/o
def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{k}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states and len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in states])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for k, v in meta["scalars"].items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_dir_atomically(final: Path, write) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for f in tmp.iterdir():  # contents on disk before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(out: str | Path) -> Path | None:
    p = Path(out) / "checkpoints" / "latest.json"
    if not p.is_file():
        return None
    try:
        name = json.loads(p.read_bytes().decode("utf-8"))["dir"]
    except (ValueError, KeyError, TypeError) as e:
        raise TrainConfigError(f"'{p}' is not a checkpoint pointer ({type(e).__name__}: {e}); resume from a step "
                               "folder with --resume-from OUT/checkpoints/step-N, or delete it") from None
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise TrainConfigError(f"'{p}': 'dir' must name a folder in {p.parent}, not {name!r}; resume with "
                               "--resume-from OUT/checkpoints/step-N, or delete it")
    d = p.parent / name
    return d if d.is_dir() else None


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig):
        validate(cfg)
        self.cfg = cfg
        self.out = Path(cfg.run.out)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world > 1
        self.owns_group = False             # this trainer started the process group (and ends it: close())
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if torch.cuda.is_available() and cfg.run.device != "cpu" else "gloo"
                dist.init_process_group(backend)
                self.owns_group = True
        self.device = resolve_device(cfg.run.device)
        if self.device.type == "cuda" and self.distributed:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.run.threads:
            torch.set_num_threads(int(cfg.run.threads))
        if self.device.type == "cpu":
            from glimr.models.cpu import tune_allocator

            tune_allocator()                # activations reused from the heap: glimr/models/cpu.py
        self.is_main = self.rank == 0

    # setup -------------------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.is_main and self.cfg.run.progress:
            tqdm.write(msg, file=sys.stderr)

    def build(self) -> None:
        from glimr.models.registry import build_model

        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed % 2**32)
        random.seed(cfg.run.seed)
        self.net = build_model(cfg.model, warn_untrained=False, weights=cfg.weights, **cfg.head_kwargs)
        self.stage = cfg.cache.stage if cfg.cache.enabled else None
        self.trainable = ({"res5": "head", "res4": "res5+head"}[self.stage] if self.stage
                          else cfg.optim.trainable)
        self.batch_size = self.per_process_batch()
        self._build_data()
        bb = self.net.backbone
        if self.trainable == "head":
            freeze(bb)
        elif self.trainable == "res5+head":
            freeze(bb.stem_to_res4)
            if cfg.optim.freeze_bn:
                freeze_batchnorm(bb.res5)
        elif cfg.optim.freeze_bn:
            freeze_batchnorm(bb)
        self.net.to(self.device)
        if cfg.optim.init_whiten == "pca":
            self._init_whiten_pca()
        self.net.train()
        inter_dim = self._probe_inter_dim()
        self.criterion = Criterion(self.net.dim, self.num_classes, cfg.loss.kind, cfg.loss.margin,
                                   cfg.loss.scale, cfg.loss.easy_margin, cfg.loss.contrastive_margin,
                                   inter_dim, cfg.loss.inter_weight, cfg.loss.loc_weight,
                                   cfg.loss.loc_map).to(self.device)
        self.step_module = TrainStep(self.net, self.criterion, self.stage)
        net_params = [p for p in self.net.parameters() if p.requires_grad]
        crit_params = list(self.criterion.parameters())
        groups = [{"params": net_params, "lr_mult": 1.0}]
        if crit_params:
            groups.append({"params": crit_params, "lr_mult": cfg.optim.classifier_lr_mult})
        self.optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
        self.autocast, need_scaler = amp_context(cfg.run.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if need_scaler else None
        self.model = self.step_module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.step_module, device_ids=ids, find_unused_parameters=False)
        self.steps_per_epoch = len(self.sampler.epoch_batches(0)) // cfg.optim.accum_steps
        if self.steps_per_epoch < 1:
            raise TrainConfigError(f"an epoch has fewer batches ({len(self.sampler.epoch_batches(0))}) than "
                                   f"optim.accum_steps: use a smaller optim.batch_size or more data")
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        if cfg.optim.max_steps:
            self.total_steps = min(self.total_steps, int(cfg.optim.max_steps))
        self.warmup_steps = (round(cfg.optim.warmup_epochs * self.steps_per_epoch)
                             if cfg.optim.warmup_epochs is not None else cfg.optim.warmup_steps)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        n_train = sum(p.numel() for p in net_params)
        self._log(f"glimr train: {cfg.model}, {self.num_classes} classes, {len(self.dataset)} items, "
                  f"trainable={self.trainable} ({n_train / 1e6:.2f} M parameters), batch {self.batch_size} per "
                  f"process x {self.world} x {cfg.optim.accum_steps} accumulated, {self.steps_per_epoch} "
                  f"steps/epoch, {self.total_steps} steps ({self.warmup_steps} warm-up), device {self.device}, "
                  f"precision {self._precision_name()}, world size {self.world}")

    @torch.no_grad()
    def _init_whiten_pca(self) -> None:
        """The GeM head's whitening FC := PCA-whitening of the GeM vectors of every cached item (the same on
        every rank: the cache is shared)."""
        from glimr.models.heads.gem import init_whiten_pca

        cache = self.dataset.cache
        pooled = np.zeros((len(cache), self.net.backbone.channels["res5"]), dtype=np.float32)
        for g in np.unique(cache.group):
            idx = np.flatnonzero(cache.group == g)
            for s in range(0, len(idx), 64):
                b = [int(i) for i in idx[s: s + 64]]
                pooled[b] = self.net.head.pool(cache.get("res5", b).to(self.device).float()).cpu().numpy()
        init_whiten_pca(self.net.head, pooled, shrink=self.cfg.optim.init_shrink)
        self._log(f"whitening FC initialised as the PCA-whitening of {len(pooled)} items' GeM vectors "
                  f"(shrink {self.cfg.optim.init_shrink})")

    def per_process_batch(self) -> int:
        return per_process_batch(self.cfg.optim, self.world)

    def _precision_name(self) -> str:
        ctx = self.autocast()
        if isinstance(ctx, torch.autocast):
            return str(ctx.fast_dtype).replace("torch.", "")
        return "fp32"

    def _build_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        if d.kind == "composites":
            from glimr.data.composites import InstanceComposites

            vpc = cfg.cache.views_per_class if self.stage else d.views_per_class
            ds = InstanceComposites(d.photos, long_side=d.long_side, paste_scale=tuple(d.paste_scale),
                                    p_clean=d.p_clean, crop_area=tuple(d.crop_area),
                                    crop_ratio=tuple(d.crop_ratio),
                                    bg_area=tuple(d.bg_area), illumination=d.illumination, hflip=d.hflip,
                                    views_per_class=vpc, clean_first=d.clean_first, seed=d.seed)
        elif d.kind == "views":
            from glimr.data.views import RealViews

            vpc = cfg.cache.views_per_class if self.stage else d.views_per_class
            ds = RealViews(d.photos, d.groups, long_side=d.long_side, views_per_class=vpc,
                           crop_area=tuple(d.crop_area), warp=d.warp, illumination=d.illumination, seed=d.seed)
            from glimr.train.whiten import refuse_benchmark

            try:                          # never train on a benchmark (UKBench, a gnd.json evaluation set)
                for f in ds.paths + [f for g in ds.groups for f in g]:
                    refuse_benchmark(Path(f), "data.photos/data.groups image")
            except ValueError as e:
                raise TrainConfigError(str(e)) from None
        else:
            from glimr.data.datasets import LabeledImages

            kw = dict(long_side=d.long_side, crop_area=tuple(d.crop_area), crop_ratio=tuple(d.crop_ratio),
                      illumination=d.illumination, hflip=d.hflip, seed=d.seed)
            ds = (LabeledImages.from_csv(d.csv, root=d.root, **kw) if d.kind == "csv"
                  else LabeledImages.from_gldv2(d.csv, root=d.root, **kw))
        self.num_classes = int(ds.num_classes)
        bs = self.batch_size
        if self.stage:
            cache = self._build_cache(ds)
            self.dataset = CachedMaps(cache, cfg.cache.flip, d.seed)
            self.sampler = GroupSizeBatchSampler(self._source(cache.labels), batch_size=bs,
                                                 sizes=cache.item_sizes(), seed=d.seed, rank=self.rank,
                                                 world_size=self.world)
        else:
            self.dataset = ds
            # square: every image (after its random crop) resized to long_side x long_side (one group)
            aspects = np.ones(len(ds)) if d.size_mode == "square" else ds.aspects
            self.sampler = GroupSizeBatchSampler(self._source(ds.labels), aspects, batch_size=bs,
                                                 long_side=d.long_side, n_groups=d.n_groups, seed=d.seed,
                                                 rank=self.rank, world_size=self.world)

    def _source(self, labels):
        d = self.cfg.data
        if d.sampler == "class_balanced":
            return ClassBalanced(labels, per_class=d.per_class, seed=d.seed)
        return RandomOrder(len(labels), seed=d.seed)

    def _build_cache(self, ds):
        from glimr.train.cache import FeatureCache, build_composite_cache, build_image_cache

        c = self.cfg.cache
        root = Path(c.dir) if c.dir else self.out / "cache"
        if self.head_changes_res5() and self.stage == "res5":
            raise TrainConfigError(f"{self.cfg.model}: the head changes what enters res5 (UGALR), so res5 "
                                   "must train: use cache.stage=res4")
        if self.is_main:
            bb = self.net.backbone.to(self.device)
            kw = dict(stage=c.stage, keep_res4=c.keep_res4, batch_size=c.batch_size,
                      workers=self.cfg.run.workers,
                      precision=self.cfg.run.precision if self.cfg.run.precision != "fp16" else "auto",
                      dtype=c.dtype, progress=self.cfg.run.progress)
            if self.cfg.data.kind in ("composites", "views"):
                build_composite_cache(root, bb, ds, n_groups=self.cfg.data.n_groups, **kw)   # + composites' boxes
            else:
                build_image_cache(root, bb, ds.paths, names=[str(p) for p in ds.paths], labels=ds.labels,
                                  max_size=self.cfg.data.long_side, **kw)
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return FeatureCache(root)

    def head_changes_res5(self) -> bool:
        bb = self.net.backbone
        return bb.channels.get("res5_in", bb.channels["res4"]) != bb.channels["res4"]

    @torch.no_grad()
    def _probe_inter_dim(self) -> int | None:
        """Width of the head's intermediate-supervision embedding (UGALR), from one small forward pass in
        training mode; random state and BatchNorm statistics are restored afterwards."""
        rng = torch.get_rng_state()
        buffers = {k: v.clone() for k, v in self.net.state_dict().items()
                   if "running_" in k or "num_batches" in k}
        try:
            if self.stage:
                from glimr.train.cache import head_forward

                cache = self.dataset.cache
                groups, counts = np.unique(cache.group, return_counts=True)
                g = groups[int(np.argmax(counts))]
                idx = [int(i) for i in np.flatnonzero(cache.group == g)[:2]]
                maps = {k: cache.get(k, idx).to(self.device) for k in cache.keys}
                out = head_forward(self.net, maps, self.stage)
            else:
                w, h = self.sampler.group_sizes[0]
                out = self.net(torch.rand(2, 3, min(h, 128), min(w, 128), device=self.device))
            emb = (out.aux or {}).get("inter_embedding")
            return int(emb.shape[1]) if emb is not None else None
        finally:
            torch.set_rng_state(rng)
            self.net.load_state_dict(buffers, strict=False)

    # checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if not self.is_main:
            return None
        ckdir = self.out / "checkpoints"
        name = f"step-{self.step:07d}"
        prefixes = trained_prefixes(self.trainable)

        def write(d: Path):
            save_model(self.net, d / "model", extra={"train": self._train_meta()}, prefixes=prefixes)
            opt_t, opt_m = _optimizer_tensors(self.optimizer)
            rng_t, rng_m = _rng_state()
            crit = {f"criterion.{k}": v.detach().cpu().contiguous()
                    for k, v in self.criterion.state_dict().items()}
            tensors = {**opt_t, **rng_t, **crit}
            if self.scaler is not None:
                tensors["scaler.scale"] = torch.tensor(float(self.scaler.get_scale()))
            save_file(tensors, str(d / "train_state.safetensors"))
            meta = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "total_steps": self.total_steps, "optimizer": opt_m, "rng": rng_m,
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "time": time.time()}
            (d / "train_state.json").write_text(json.dumps(meta))
            (d / "config.yaml").write_text(dump_config(self.cfg))

        _write_dir_atomically(ckdir / name, write)
        atomic_write_bytes(ckdir / "latest.json", json.dumps({"dir": name, "step": self.step}).encode())
        done = sorted(p for p in ckdir.glob("step-*") if p.is_dir())
        for old in done[: max(0, len(done) - max(1, self.cfg.run.keep))]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return ckdir / name

    def _train_meta(self) -> dict:
        return {"config": self.cfg.to_dict(), "step": self.step, "epoch": self.epoch,
                "trainable": self.trainable}

    def load_checkpoint(self, d: Path) -> None:
        try:
            self._load_checkpoint(d)
        except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError, SafetensorError) as e:
            if isinstance(e, TrainConfigError):
                raise
            raise TrainConfigError(f"cannot resume from '{d}': its files are incomplete or malformed "
                                   f"({type(e).__name__}: {e}); resume from an older step folder with "
                                   "--resume-from, or start again") from e

    def _load_checkpoint(self, d: Path) -> None:
        saved = yaml.safe_load((d / "config.yaml").read_text())
        now = self.cfg.to_dict()
        diffs = [(s, k) for s, sec in now.items() if isinstance(sec, dict) for k in sec
                 if saved.get(s, {}).get(k) != sec[k] and (s, k) not in RESUMABLE_CHANGES
                 and s != "head_kwargs"]
        diffs += [(k, None) for k in ("model", "weights", "head_kwargs") if saved.get(k) != now.get(k)]
        if diffs:
            raise TrainConfigError(f"cannot resume from '{d}': the config differs in "
                                   f"{['.'.join(x for x in p if x) for p in diffs]} (only "
                                   f"{sorted('.'.join(p) for p in RESUMABLE_CHANGES)} may change)")
        state = load_file(str(d / "model.safetensors"))
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if unexpected:
            raise TrainConfigError(f"'{d}/model.safetensors' does not fit {self.cfg.model}: {unexpected[:5]}")
        tensors = load_file(str(d / "train_state.safetensors"))
        meta = json.loads((d / "train_state.json").read_text())
        self.criterion.load_state_dict({k[len("criterion."):]: v for k, v in tensors.items()
                                        if k.startswith("criterion.")})
        _load_optimizer(self.optimizer, {k: v.to(self.device) for k, v in tensors.items()
                                         if k.startswith("optim.")}, meta["optimizer"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        _set_rng_state(tensors, meta["rng"])
        self.step, self.epoch, self.batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        self._log(f"resumed from {d} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    # the loop ----------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.sampler.set_epoch(epoch, start_batch)
        self.dataset.set_epoch(epoch)
        g = torch.Generator().manual_seed(self.cfg.run.seed * 100003 + epoch)
        workers = 0 if self.stage else self.cfg.run.workers
        kw = dict(num_workers=workers, persistent_workers=False, prefetch_factor=2) if workers > 0 else {}
        return DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=_collate, generator=g,
                          pin_memory=self.device.type == "cuda", **kw)

    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.cfg.optim, self.warmup_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr

    def fit(self, resume: bool | str | Path = False) -> dict:
        cfg = self.cfg
        if resume:
            explicit = isinstance(resume, (str, Path)) and not isinstance(resume, bool)
            d = Path(resume) if explicit else latest_checkpoint(self.out)
            if d is None:
                raise FileNotFoundError(f"nothing to resume: no checkpoint under '{self.out}/checkpoints' "
                                        "(run without --resume to start)")
            self.load_checkpoint(d)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.out / "config.yaml", dump_config(cfg).encode())
        log_path = self.out / "log.jsonl"
        accum = cfg.optim.accum_steps
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {cfg.model}", unit="step",
                   disable=not (self.is_main and cfg.run.progress), dynamic_ncols=True)
        t_start = time.time()
        t_log, n_log, parts_acc, n_parts = time.time(), 0, {}, 0
        last_saved = self.step
        self.net.train()
        stop = self.step >= self.total_steps
        while not stop and self.epoch < cfg.optim.epochs:
            loader = self._loader(self.epoch, self.batch_in_epoch)
            micro = 0
            self.optimizer.zero_grad(set_to_none=True)
            for batch in loader:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                micro += 1
                sync = micro % accum == 0
                ctx = self.model.no_sync() if (self.distributed and not sync) else contextlib.nullcontext()
                with ctx:
                    with self.autocast():
                        loss, parts = self.model(batch)
                    scaled = loss / accum
                    if self.scaler is not None:
                        self.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                n_log += int(batch["label"].shape[0]) * self.world
                for k, v in parts.items():
                    parts_acc[k] = parts_acc.get(k, 0.0) + v
                n_parts += 1
                if not sync:
                    continue
                lr = self._set_lr()
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if cfg.optim.grad_clip:
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.batch_in_epoch += accum
                bar.update(1)
                if not math.isfinite(parts.get("loss", 0.0)):
                    raise FloatingPointError(f"the loss is {parts.get('loss')} at step {self.step}: lower "
                                             "optim.lr or set optim.grad_clip")
                if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                    now = time.time()
                    rec = {"step": self.step, "epoch": self.epoch, "lr": lr,
                           **{k: v / n_parts for k, v in parts_acc.items()},
                           "images_per_s": n_log / max(1e-9, now - t_log),
                           "elapsed_s": round(now - t_start, 2)}
                    if self.is_main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}",
                                    ips=f"{rec['images_per_s']:.0f}")
                    t_log, n_log, parts_acc, n_parts = now, 0, {}, 0
                if self.step % cfg.run.save_every == 0:
                    self.save_checkpoint()
                    last_saved = self.step
                if self.step >= self.total_steps:
                    stop = True
                    break
            if not stop:
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.step != last_saved:
                    self.save_checkpoint()
                    last_saved = self.step
        bar.close()
        if self.step != last_saved:
            self.save_checkpoint()
        summary = {"steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 3),
                   "seconds": round(time.time() - t_start, 1),
                   "out": str(self.out)}
        if self.is_main:
            self.export()
            atomic_write_bytes(self.out / "summary.json", json.dumps(summary, indent=1).encode())
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return summary

    def export(self) -> Path:
        """OUT/model.safetensors + OUT/model.json: the trained model (only the trained parts if some parts
        were frozen)."""
        self.net.eval()
        p = save_model(self.net, self.out / "model", extra={"train": self._train_meta()},
                       prefixes=trained_prefixes(self.trainable))
        self.net.train()
        return p


    def close(self) -> None:
        """Release the DistributedDataParallel wrapper, then end the process group this trainer started, as
        PyTorch asks of every process before it exits (a group the caller started stays open). A DDP wrapper
        still alive when the process ended sometimes aborted a rank after training had finished ("terminate
        called without an active exception", SIGABRT; 13 of 30 runs of a bare 2-rank gloo DDP script on a
        loaded 2-core CPU, none in 24 once the wrapper was released first)."""
        if getattr(self, "model", None) is not None and self.model is not getattr(self, "step_module", None):
            self.model = self.step_module
            gc.collect()
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def train(cfg: TrainConfig, resume: bool | str | Path = False) -> dict:
    t = Trainer(cfg)
    try:
        t.build()
        return t.fit(resume)
    finally:
        t.close()


def config_schema() -> dict[str, Any]:
    """Every config key with its default (for --help and docs)."""
    return TrainConfig().to_dict()
