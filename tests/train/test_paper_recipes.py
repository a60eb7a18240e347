"""The papers' training recipes, configs/paper_*.yaml: each holds its paper's printed values (a table here,
with the source of each), every recipe value carries a comment naming its source, and each config trains on
a tiny GLDv2-format set made here from ../shared/data/photos (never ukbench, real-dev or coil100): 2 steps on
the CPU, with only the data paths, the image size, the batch, the step count and the run settings changed.

Backbones: every config runs with its head on EfficientNet-Lite0 (random weights) so that the seven runs stay
fast; GLAM (ResNet-101) and UGALR (ResNet-50, whose res5 takes LALM's extra channel) also run on their own
ResNet, with random weights (the ImageNet ResNet weights need a download: not possible in the tests) and
BatchNorm learning its statistics (optim.freeze_bn=false: a random ResNet has none to keep).
Also here: the trainer settings these recipes brought (data.size_mode square, optim.global_batch_size,
optim.warmup_epochs)."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from glimr.models.registry import build_model
from glimr.train.trainer import (
    OptimConfig,
    TrainConfigError,
    Trainer,
    latest_checkpoint,
    load_config,
    lr_at,
    per_process_batch,
    train,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# (dotted key, the paper's value, where the paper says it). Only values the papers print; the configs'
# other values are marked "not given" there, with the choice made.
GLAM = "GLAM (WACV 2022)"
CIDER = "CiDeR (CVPR 2024)"
UGALR = "UGALR (ICLR 2022 submission)"
DPLG = "DPLG (ICIP 2022)"
COATT = "co-attention (Neural Networks 2023)"
PAPER_VALUES: dict[str, list[tuple[str, object, str]]] = {
    "paper_glam_resnet101_gldv2.yaml": [
        ("model", "glam-resnet101", f"{GLAM} Sec. 4.2: ResNet101 backbone"),
        ("head_kwargs.dim", 512, f"{GLAM} Sec. 4.2: d = 512"),
        ("head_kwargs.eca_kernel", 3, f"{GLAM} Sec. 4.2: ECANet k = 3"),
        ("head_kwargs.p", 3.0, f"{GLAM} Sec. 4.2: GeM p = 3"),
        ("head_kwargs.dilations", [1, 2, 3], f"{GLAM} Sec. 3.1 (Fig. 3's 1, 3, 5 is a typo)"),
        ("loss.kind", "arcface", f"{GLAM} Sec. 4.2"),
        ("loss.margin", 0.3, f"{GLAM} Sec. 4.2: margin 0.3"),
        ("optim.lr", 1e-3, f"{GLAM} Sec. 4.2: initial learning rate 10^-3"),
        ("optim.momentum", 0.9, f"{GLAM} Sec. 4.2"),
        ("optim.weight_decay", 1e-5, f"{GLAM} Sec. 4.2"),
        ("optim.global_batch_size", 64, f"{GLAM} Sec. 4.2: batch size 64"),
        ("data.size_mode", "group", f"{GLAM} Sec. 4.2 / Table 8: group-size sampling"),
        ("data.csv", "data/gldv2/train_clean.csv", f"{GLAM} Sec. 4.1: GLDv2-clean"),
    ],
    "paper_cider_resnet101_rgldv2.yaml": [
        ("model", "cider-resnet101", f"{CIDER} Tables 4, 5: R101"),
        ("head_kwargs.dim", None, f"{CIDER} Table 5: 2048-d (GeM of res5, no FC)"),
        ("head_kwargs.num_masks", 2, f"{CIDER} Table 9: T = 2"),
        ("head_kwargs.beta_mean", 0.1, f"{CIDER} Table 8: eps ~ N(0.1, 0.9)"),
        ("head_kwargs.beta_std", 0.9, f"{CIDER} Table 8 (0.9 read as the standard deviation)"),
        ("loss.kind", "arcface", f"{CIDER} Tables 4, 5: ArcFace"),
        ("optim.trainable", "all", f"{CIDER} Sec. 5.1: CiDeR trains in a single stage, end to end"),
        ("data.kind", "gldv2", f"{CIDER} Sec. 3: RGLDv2-clean, a subset of GLDv2"),
    ],
    "paper_cider_resnet101_sfm120k.yaml": [
        ("model", "cider-resnet101", f"{CIDER} Table 5: R101"),
        ("head_kwargs.dim", None, f"{CIDER} Table 5: 2048-d"),
        ("head_kwargs.num_masks", 2, f"{CIDER} Table 9"),
        ("head_kwargs.beta_mean", 0.1, f"{CIDER} Table 8"),
        ("head_kwargs.beta_std", 0.9, f"{CIDER} Table 8"),
        ("loss.kind", "arcface", f"{CIDER} Table 5: loss AF on SfM-120k"),
        ("data.kind", "csv", "SfM-120k as (image, landmark) rows"),
    ],
    "paper_ugalr_resnet50_gldv2.yaml": [
        ("model", "ugalr-resnet50", f"{UGALR} Sec. 4.2: ResNet-50"),
        ("head_kwargs.dim", 512, f"{UGALR} Sec. 4.2: FC 2048 -> 512"),
        ("head_kwargs.p", 3.0, f"{UGALR} Sec. 4.2: p = 3"),
        ("head_kwargs.learn_p", False, f"{UGALR} Sec. 4.2: p is set"),
        ("loss.margin", 0.15, f"{UGALR} Sec. 4.2: m = 0.15"),
        ("loss.scale", 30.0, f"{UGALR} Sec. 4.2: scale = 30"),
        ("loss.inter_weight", 0.6, f"{UGALR} Sec. 4.2: lambda = 0.6"),
        ("optim.lr", 0.05, f"{UGALR} Sec. 4.2: initial learning rate 0.05"),
        ("optim.global_batch_size", 128, f"{UGALR} Sec. 4.2: batch size 128"),
        ("optim.epochs", 100, f"{UGALR} Sec. 4.2: 100 epochs"),
        ("data.size_mode", "square", f"{UGALR} Sec. 4.2: resized into 512 x 512"),
        ("data.long_side", 512, f"{UGALR} Sec. 4.2: 512 x 512"),
        ("data.csv", "data/gldv2/train_clean.csv", f"{UGALR} Sec. 4.1: GLDv2 clean"),
    ],
    "paper_dplg_resnet50_gldv2.yaml": [
        ("model", "dplg-resnet50", f"{DPLG} Sec. 3.1: Resnet50"),
        ("head_kwargs.dim", 512, f"{DPLG} Sec. 3.4: D = 512"),
        ("head_kwargs.p", 3.0, f"{DPLG} Sec. 3.1: p = 3"),
        ("head_kwargs.learn_p", False, f"{DPLG} Sec. 3.1: p is set"),
        ("loss.margin", 0.15, f"{DPLG} Sec. 3.4: m = 0.15"),
        ("loss.scale", 30.0, f"{DPLG} Sec. 3.4: gamma = 30"),
        ("optim.lr", 0.03, f"{DPLG} Sec. 3.4: initial learning rate 0.03"),
        ("optim.epochs", 100, f"{DPLG} Sec. 3.4: no more than 100 epochs"),
    ],
    "paper_gem_resnet101_gldv2.yaml": [
        ("model", "gem-resnet101", f"{COATT} Table 1: R101-GeM†"),
        ("head_kwargs.dim", 2048, f"{COATT} Sec. 3.2 / 5.1: trained whitening FC, 2048-d"),
        ("head_kwargs.p", 3.0, f"{COATT} Sec. 3.2, 6.1: p = 3"),
        ("head_kwargs.learn_p", False, f"{COATT} Sec. 3.2: p is set"),
        ("loss.margin", 0.15, f"{COATT} Sec. 6.1: m = 0.15"),
        ("loss.scale", 30.0, f"{COATT} Sec. 6.1: gamma = 30"),
        ("optim.lr", 0.05, f"{COATT} Sec. 6.1: initial learning rate 0.05"),
        ("optim.weight_decay", 1e-4, f"{COATT} Sec. 6.1: weight decay 0.0001"),
        ("optim.global_batch_size", 128, f"{COATT} Sec. 6.1: batch size 128"),
        ("optim.epochs", 50, f"{COATT} Sec. 6.1: no more than 50 epochs"),
        ("data.size_mode", "square", f"{COATT} Sec. 6.1: 512 x 512 pixels"),
        ("data.long_side", 512, f"{COATT} Sec. 6.1"),
    ],
    "paper_dolg_resnet50_gldv2.yaml": [   # DOLG as DPLG trained it ("the exact same setting", DPLG Sec. 1)
        ("model", "dolg-resnet50", f"{DPLG} Table 1: R50-DOLG"),
        ("head_kwargs.dim", 512, f"{DPLG} Sec. 3.4: D = 512"),
        ("loss.margin", 0.15, f"{DPLG} Sec. 3.4"),
        ("loss.scale", 30.0, f"{DPLG} Sec. 3.4"),
        ("optim.lr", 0.03, f"{DPLG} Sec. 3.4"),
        ("optim.epochs", 100, f"{DPLG} Sec. 3.4 and Sec. 4"),
        ("optim.global_batch_size", 128, f"{COATT} Sec. 6.1 (DOLG's method)"),
        ("data.long_side", 512, f"{COATT} Sec. 6.1 (DOLG's method)"),
    ],
}
# (head, backbone kept) runs: every config on Lite0, and GLAM / UGALR on their own ResNet as well
RUNS = [(name, "lite0") for name in PAPER_VALUES] + [("paper_glam_resnet101_gldv2.yaml", "resnet"),
                                                      ("paper_ugalr_resnet50_gldv2.yaml", "resnet")]


def _get(cfg, dotted: str):
    node = cfg.to_dict()
    for part in dotted.split("."):
        node = node[part]
    return node


def test_every_recipe_config_is_in_the_table():
    assert sorted(p.name for p in CONFIGS.glob("paper_*.yaml")) == sorted(PAPER_VALUES)


@pytest.mark.parametrize("name", sorted(PAPER_VALUES))
def test_config_holds_the_papers_values(name):
    cfg = load_config(CONFIGS / name)
    for key, value, source in PAPER_VALUES[name]:
        # exact: each side is the same decimal literal (the paper's printed number) parsed to a float
        assert _get(cfg, key) == value, f"{name}: {key} = {_get(cfg, key)!r}, the paper says {value!r} ({source})"
    assert cfg.model.split("-")[1] in ("resnet50", "resnet101") and cfg.weights == "pretrained"
    assert cfg.loss.kind == "arcface" and not cfg.cache.enabled


@pytest.mark.parametrize("name", sorted(PAPER_VALUES))
def test_every_recipe_value_names_its_source(name):
    """Each value of model / weights / head_kwargs / data / cache / loss / optim carries a comment (a paper
    and section, or "not given: ..."), and the header says how to launch it and where the weights come from."""
    text = (CONFIGS / name).read_text()
    section = None
    for line in text.splitlines():
        if re.match(r"^[a-z_]+:", line):
            section = line.split(":")[0]
        if section == "run" or not re.match(r"^\s*[a-z_]+:\s*\S", line) or re.match(r"^[a-z_]+:\s*$", line):
            continue
        assert "#" in line, f"{name}: no source for {line.strip()!r}"
    assert "torchrun --nproc_per_node" in text and f"-m glimr.train.cli configs/{name}" in text
    assert "online" in text and "../shared/papers/" in text
    assert "not given" in text      # what the paper leaves open is said to be open


@pytest.fixture(scope="module")
def tiny_gldv2(shared_data, tmp_path_factory) -> Path:
    """3 landmarks x 2 images in GLDv2's layout: train.csv (id,landmark_id), train/a/b/c/<id>.jpg; and the
    same images as a (path, label) CSV for the SfM-120k-style config. Images: small crops of real photos,
    of two aspect ratios."""
    root = tmp_path_factory.mktemp("gldv2")
    photos = sorted((shared_data / "photos").glob("*.JPEG"))[:3]
    rows, paths = ["id,landmark_id"], ["path,label"]
    for c, p in enumerate(photos):
        img = Image.open(p).convert("RGB")
        for v, size in enumerate([(80, 64), (64, 80)]):
            iid = f"{c:x}{v:x}{c + v:x}{'0123456789abcdef'[c * 5 + v]}e5d1c0ffee{c}{v}"
            rel = Path(iid[0]) / iid[1] / iid[2] / f"{iid}.jpg"
            (root / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
            img.crop((v * 10, 0, img.width - v * 10, img.height)).resize(size).save(root / "train" / rel)
            rows.append(f"{iid},{7000 + c}")
            paths.append(f"{rel.as_posix()},landmark{c}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "paths.csv").write_text("\n".join(paths) + "\n")
    return root


def _overrides(name: str, data: Path, out: Path, backbone: str) -> list[str]:
    cfg = load_config(CONFIGS / name)
    csv = "paths.csv" if cfg.data.kind == "csv" else "train.csv"
    ov = [f"data.csv={data / csv}", f"data.root={data / 'train'}",      # the data paths
          "data.long_side=64",                                          # image size tiny
          "optim.global_batch_size=2", "optim.max_steps=2",             # batch small, 2 steps
          f"run.out={out}", "run.device=cpu", "run.precision=fp32", "run.workers=0", "run.threads=1",
          "run.progress=false", "run.log_every=1", "weights=none"]      # no download in tests
    if backbone == "lite0":
        ov.append(f"model={cfg.model.split('-')[0]}-lite0")
    else:
        # a random ResNet has no BatchNorm statistics to keep (the recipes keep ImageNet's): with them frozen
        # at their initial values its activations reach ~1e17 by res4 and the first SGD step diverges
        ov.append("optim.freeze_bn=false")
    return ov


@pytest.mark.parametrize("name,backbone", RUNS, ids=[f"{n[6:-5]}-{b}" for n, b in RUNS])
def test_recipe_trains_on_a_tiny_gldv2_set(name, backbone, tiny_gldv2, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / name, _overrides(name, tiny_gldv2, out, backbone))
    try:
        summary = train(cfg)
        assert summary["steps"] == 2
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2]
        assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log), log
        ck = latest_checkpoint(out)
        assert ck is not None and ck.name == "step-0000002"
        assert (ck / "model.safetensors").is_file() and (ck / "train_state.safetensors").is_file()
        assert yaml.safe_load((ck / "config.yaml").read_text())["model"] == cfg.model
        # the trained model loads, holds the saved weights, and training changed them
        saved = load_file(str(out / "model.safetensors"))
        net = build_model(checkpoint=out / "model.safetensors")
        state = net.state_dict()
        assert net.name == cfg.model and set(saved) == set(state)
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        torch.manual_seed(cfg.run.seed)              # the trainer's initialisation, before any step
        start = build_model(cfg.model, weights="none", warn_untrained=False, **cfg.head_kwargs).state_dict()
        assert any(not torch.equal(start[k], v) for k, v in saved.items() if k.startswith("head."))
        assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
        if backbone != "lite0":
            return   # a random ResNet's eval-mode forward overflows (BatchNorm statistics of 2 steps)
        with torch.no_grad():
            d = net.eval()(torch.rand(1, 3, 64, 64)).descriptor
        expect = cfg.head_kwargs.get("dim") or net.dim
        assert d.shape == (1, expect) and torch.isfinite(d).all()
        assert float(d.norm()) == pytest.approx(1.0, abs=1e-5)        # L2-normalised, float32 rounding
    finally:
        shutil.rmtree(out, ignore_errors=True)   # ResNet runs write ~0.5 GB: do not keep it in /tmp


# ------------------------------------------------------------- the trainer settings the recipes brought
def test_global_batch_is_split_over_processes_and_accumulation():
    assert per_process_batch(OptimConfig(batch_size=7), 4) == 7                    # not set: per process
    assert per_process_batch(OptimConfig(global_batch_size=128), 4) == 32          # 4 GPUs, as co-attention
    assert per_process_batch(OptimConfig(global_batch_size=64), 8) == 8            # 8 GPUs, as GLAM
    assert per_process_batch(OptimConfig(global_batch_size=128, accum_steps=4), 2) == 16
    with pytest.raises(TrainConfigError, match="not divisible by world size 3"):
        per_process_batch(OptimConfig(global_batch_size=128), 3)


def _built(tiny_gldv2, tmp_path, extra: list[str]) -> Trainer:
    cfg = load_config(CONFIGS / "paper_gem_resnet101_gldv2.yaml",
                      _overrides("paper_gem_resnet101_gldv2.yaml", tiny_gldv2, tmp_path / "r", "lite0") + extra)
    t = Trainer(cfg)
    t.build()
    return t


def test_square_size_mode_and_group_sizes(tiny_gldv2, tmp_path):
    """square: every image long_side x long_side; group: the images' aspect ratios (80x64 and 64x80 here)."""
    sq = _built(tiny_gldv2, tmp_path, ["data.long_side=96", "optim.global_batch_size=3"])
    assert sq.sampler.group_sizes == [(96, 96)]
    batch = next(iter(sq._loader(0, 0)))
    assert batch["image"].shape == (3, 3, 96, 96) and sq.batch_size == 3
    gr = _built(tiny_gldv2, tmp_path, ["data.long_side=96", "data.size_mode=group", "data.n_groups=2"])
    assert sorted(gr.sampler.group_sizes) == [(64, 96), (96, 64)]    # (w, h), sides rounded to 32
    with pytest.raises(TrainConfigError, match="size_mode must be group or square"):
        load_config(CONFIGS / "paper_gem_resnet101_gldv2.yaml", ["data.size_mode=fixed"])
    with pytest.raises(TrainConfigError, match="feature cache"):     # cached maps keep their group sizes
        load_config(CONFIGS / "paper_gem_resnet101_gldv2.yaml", ["cache.enabled=true"])


def test_warmup_in_epochs(tiny_gldv2, tmp_path):
    t = _built(tiny_gldv2, tmp_path, ["optim.warmup_epochs=2", "optim.max_steps=null", "optim.epochs=4"])
    assert t.steps_per_epoch == 3 and t.total_steps == 12 and t.warmup_steps == 6   # 6 images / batch 2
    lr = [lr_at(s, t.total_steps, t.cfg.optim, t.warmup_steps) for s in range(12)]
    # exact up to float rounding (1e-12): linear warm-up lr * (s + 1) / 6, then cosine from lr
    assert lr[:6] == pytest.approx([0.05 * (s + 1) / 6 for s in range(6)], abs=1e-12)
    assert lr[6] == pytest.approx(0.05, abs=1e-12) and lr[9] == pytest.approx(0.025, abs=1e-12)
    t._set_lr()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 6, abs=1e-12)
