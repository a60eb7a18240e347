"""`glimr train` on real photos (../shared/data/photos), at tiny sizes so that the whole file runs in about a
minute on 2 CPU cores: the loss goes down, checkpoints and logs are written, a run killed mid-way resumes
from its last checkpoint with the same state and ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from glimr.models.registry import build_model
from glimr.train.trainer import (OptimConfig, Trainer, TrainConfigError, apply_overrides, config_from_dict,
                                 latest_checkpoint, load_config, lr_at, train, validate)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photo_dir(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for p in sorted((shared_data / "photos").glob("*.JPEG"))[:8]:
        os.symlink(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache") / "composites"


def _cfg(photo_dir, out, cache_dir=None, **sections) -> dict:
    d = {"model": "gem-lite0", "head_kwargs": {"dim": 64},
         "data": {"kind": "composites", "photos": str(photo_dir), "long_side": 64, "n_groups": 1,
                  "clean_first": 1, "p_clean": 0.0},
         "cache": {"enabled": cache_dir is not None, "dir": str(cache_dir) if cache_dir else None,
                   "views_per_class": 4, "batch_size": 8},
         "optim": {"epochs": 8, "batch_size": 8, "lr": 0.01, "warmup_steps": 2, "classifier_lr_mult": 10.0},
         "run": {"out": str(out), "workers": 0, "save_every": 4, "log_every": 1, "threads": 1,
                 "progress": False, "precision": "fp32"}}      # fp32: the tests compare numbers
    for sec, kv in sections.items():
        if isinstance(kv, dict):
            d.setdefault(sec, {}).update(kv)
        else:
            d[sec] = kv
    return d


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_short_real_training_run_lowers_the_loss(photo_dir, cache_dir, tmp_path):
    # the FC on the raw GeM vector (norm_before_whiten=False): at this size it halves the loss within 32 steps;
    # the paper's form (FC on the L2-normalised vector, the default) learns slower from a random FC (0.64 of the
    # first loss at lr 0.02), which is why the real recipe initialises it with PCA-whitening
    summary = train(config_from_dict(_cfg(photo_dir, tmp_path / "run", cache_dir,
                                          head_kwargs={"dim": 64, "norm_before_whiten": False})))
    log = _log(tmp_path / "run")
    assert summary["steps"] == 32 and log[-1]["step"] == 32            # 8 classes x 4 views / 8 = 4 steps/epoch
    first, last = np.mean([r["loss"] for r in log[:4]]), np.mean([r["loss"] for r in log[-4:]])
    assert last < 0.5 * first, (first, last)
    for r in log:
        assert {"step", "epoch", "lr", "loss", "arcface", "images_per_s"} <= set(r) and r["images_per_s"] > 0
    # the config next to every checkpoint and the run, the trained model loadable by name + checkpoint
    ck = latest_checkpoint(tmp_path / "run")
    assert ck.name == "step-0000032" and (ck / "config.yaml").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert yaml.safe_load((ck / "config.yaml").read_text())["model"] == "gem-lite0"
    model = build_model(checkpoint=tmp_path / "run" / "model.safetensors")
    assert model.dim == 64
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(k.startswith("head.") for k in saved)                   # head-only: the backbone was frozen
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v)
    ref = build_model("gem-lite0")                                     # the rest is the packaged backbone
    for k, v in ref.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v)


def test_cached_head_training_equals_training_on_the_maps(photo_dir, cache_dir, tmp_path):
    """The cached maps are what the frozen backbone computes on the views (checked through descriptors)."""
    from glimr.data.composites import InstanceComposites
    from glimr.data.transforms import to_uint8_tensor
    from glimr.train.cache import FeatureCache, cached_descriptors

    train(config_from_dict(_cfg(photo_dir, tmp_path / "r", cache_dir, optim={"epochs": 1})))
    cache = FeatureCache(cache_dir)
    net = build_model(checkpoint=tmp_path / "r" / "model.safetensors")
    d = cached_descriptors(net, cache, progress=False, precision="fp32")
    ds = InstanceComposites(str(photo_dir), long_side=64, views_per_class=4, clean_first=1, p_clean=0.0)
    for i in (0, 13, 31):
        img, info = ds.render(i, cache.item_sizes()[i], epoch=0)
        x = to_uint8_tensor(img)[None].float() / 255
        with torch.no_grad():
            ref = net(x).descriptor[0].numpy()
            r4 = net.backbone.forward_res4(x)
            r5 = net.backbone.res5(r4)
        assert int(cache.labels[i]) == info.label
        assert torch.allclose(cache.get("res4", [i]), r4, rtol=2e-3, atol=2e-3)   # float16 storage
        assert torch.allclose(cache.get("res5", [i]), r5, rtol=2e-3, atol=2e-3)
        assert float(d[i] @ ref) > 0.995


def test_image_mode_trains_whole_pipeline_with_accumulation(photo_dir, tmp_path):
    cfg = _cfg(photo_dir, tmp_path / "img", None, model="gem-lite0", head_kwargs={"dim": 32},
               data={"views_per_class": 2, "n_groups": 2, "p_clean": 0.25, "sampler": "class_balanced",
                     "per_class": 2},
               optim={"epochs": 1, "batch_size": 2, "accum_steps": 2, "trainable": "res5+head"},
               run={"save_every": 2})
    summary = train(config_from_dict(cfg))
    assert summary["steps"] >= 2
    log = _log(tmp_path / "img")
    assert all(math.isfinite(r["loss"]) for r in log)
    saved = load_file(str(tmp_path / "img" / "model.safetensors"))
    assert any(k.startswith("backbone.res5.") for k in saved) and not any(k.startswith("backbone.stem") for k in saved)
    net = build_model(checkpoint=tmp_path / "img" / "model.safetensors")
    assert net.dim == 32


def _hash_state(d: Path) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in load_file(str(d / "model.safetensors")).items()}
    out.update({k: v for k, v in load_file(str(d / "train_state.safetensors")).items() if not k.startswith("rng.")})
    return out


def test_resume_after_kill_continues_exactly(photo_dir, cache_dir, tmp_path):
    # CiDeR: random background beta and BatchNorm in its head: the random state must be restored too
    base = _cfg(photo_dir, tmp_path / "ref", cache_dir, model="cider-lite0", head_kwargs={"dim": 64},
                optim={"epochs": 10}, run={"save_every": 3})
    ref = train(config_from_dict(base))
    assert ref["steps"] == 40

    cfg_path = tmp_path / "kill.yaml"
    killed = _cfg(photo_dir, tmp_path / "kill", cache_dir, model="cider-lite0", head_kwargs={"dim": 64},
                  optim={"epochs": 10}, run={"save_every": 3})
    cfg_path.write_text(yaml.safe_dump(killed))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "glimr.train.cli", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    latest = tmp_path / "kill" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 6:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the training run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = json.loads(latest.read_text())["step"]
    assert 6 <= at < 40
    assert not (tmp_path / "kill" / "model.safetensors").exists()   # it really stopped mid-way

    t = Trainer(load_config(cfg_path))
    t.build()
    t.load_checkpoint(latest_checkpoint(tmp_path / "kill"))
    assert t.step == at                                             # the same step ...
    ck = _hash_state(latest_checkpoint(tmp_path / "kill"))
    for k, v in t.net.state_dict().items():                         # ... and the same state
        if f"model.{k}" in ck:
            assert torch.equal(v, ck[f"model.{k}"])
    summary = train(load_config(cfg_path), resume=True)
    assert summary["steps"] == 40
    a, b = _hash_state(tmp_path / "ref" / "checkpoints" / "step-0000040"), \
        _hash_state(tmp_path / "kill" / "checkpoints" / "step-0000040")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6), k
    ra = {r["step"]: r["loss"] for r in _log(tmp_path / "ref")}
    rb = {r["step"]: r["loss"] for r in _log(tmp_path / "kill")}
    assert all(abs(ra[s] - rb[s]) < 1e-4 for s in rb)


def test_resume_refuses_a_changed_config(photo_dir, cache_dir, tmp_path):
    train(config_from_dict(_cfg(photo_dir, tmp_path / "r", cache_dir, optim={"epochs": 1})))
    cfg = config_from_dict(_cfg(photo_dir, tmp_path / "r", cache_dir, optim={"epochs": 2, "lr": 0.5}))
    with pytest.raises(TrainConfigError, match="optim.lr"):
        train(cfg, resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(config_from_dict(_cfg(photo_dir, tmp_path / "none", cache_dir)), resume=True)


def test_ugalr_trains_res5_from_res4_cache_with_intermediate_supervision(photo_dir, tmp_path):
    cfg = _cfg(photo_dir, tmp_path / "u", tmp_path / "c4", model="ugalr-lite0",
               cache={"stage": "res4", "views_per_class": 2},
               loss={"margin": 0.15, "scale": 30.0, "inter_weight": 0.6}, optim={"epochs": 1, "batch_size": 4})
    train(config_from_dict(cfg))
    log = _log(tmp_path / "u")
    for r in log:
        assert r["loss"] == pytest.approx(r["arcface"] + 0.6 * r["inter_ce"], rel=1e-4)
    saved = load_file(str(tmp_path / "u" / "model.safetensors"))
    assert any(k.startswith("backbone.res5.") for k in saved)
    with pytest.raises(TrainConfigError, match="res4"):
        train(config_from_dict(_cfg(photo_dir, tmp_path / "u5", tmp_path / "c5", model="ugalr-lite0")))


def test_cider_with_box_supervised_attention(photo_dir, cache_dir, tmp_path):
    """loss.loc_weight: CiDeR's attention map A learns from the pasted boxes of the composites."""
    from glimr.train.cache import FeatureCache

    cfg = _cfg(photo_dir, tmp_path / "loc", cache_dir, model="cider-lite0",
               head_kwargs={"dim": 64, "context": "none"}, loss={"loc_weight": 2.0}, optim={"epochs": 2})
    train(config_from_dict(cfg))
    boxes = FeatureCache(cache_dir).boxes
    assert boxes.shape == (32, 4) and np.allclose(boxes[:8], [0, 0, 1, 1])    # view 0 of each class is clean
    assert (boxes[8:, 2] - boxes[8:, 0] < 0.75).all()                           # composites: a pasted box
    for r in _log(tmp_path / "loc"):
        assert r["loss"] == pytest.approx(r["arcface"] + 2.0 * r["localization"], rel=1e-4)


def test_lr_schedule_warmup_then_cosine():
    o = OptimConfig(lr=0.1, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, o) == pytest.approx(0.01) and lr_at(9, 110, o) == pytest.approx(0.1)
    assert lr_at(10, 110, o) == pytest.approx(0.1)
    assert lr_at(60, 110, o) == pytest.approx(0.01 + 0.09 * 0.5)
    assert lr_at(110, 110, o) == pytest.approx(0.01)
    vals = [lr_at(s, 110, o) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_config_overrides_and_errors(tmp_path):
    d = apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr=0.02", "data.paste_scale=[0.2, 0.6]", "model=gem-lite0"])
    assert d == {"optim": {"lr": 0.02}, "data": {"paste_scale": [0.2, 0.6]}, "model": "gem-lite0"}
    with pytest.raises(TrainConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(TrainConfigError, match="unknown keys in 'optim'"):
        config_from_dict({"optim": {"learning_rate": 1}})
    with pytest.raises(TrainConfigError, match="data.photos"):
        load_config(None, ["data.kind=composites"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    shipped = load_config(REPO / "configs" / "train_glam_lite0_composites.yaml")
    assert shipped.data.photos.endswith("photos") and "ukbench" not in shipped.data.photos
    assert shipped.loss.margin == 0.3 and shipped.cache.enabled


def test_cli_help_has_an_example():
    from glimr.train.cli import register

    parser = argparse.ArgumentParser(prog="glimr")
    register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["train"]
    text = sub.format_help()
    assert "glimr train configs/" in text and "--resume" in text
    r = subprocess.run([sys.executable, "-m", "glimr.train.cli", "configs/train_glam_lite0_composites.yaml",
                        "optim.lr=0.5", "--print-config"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["optim"]["lr"] == 0.5


def test_torchrun_ddp_two_processes(photo_dir, cache_dir, tmp_path):
    """Multi-process training through torchrun (gloo on CPU; NCCL on GPUs): every rank takes its own share
    of the batches, gradients are averaged by DistributedDataParallel, rank 0 writes the model, and each
    rank's train() ends the process group it started (each rank runs the `glimr train` CLI's main, then
    says whether its group is still open)."""
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(photo_dir, tmp_path / "ddp", cache_dir, optim={"epochs": 2})))
    train(config_from_dict(_cfg(photo_dir, tmp_path / "warm", cache_dir, optim={"epochs": 1})))   # cache ready
    script = tmp_path / "rank.py"
    script.write_text("import os, sys, torch.distributed as dist\n"
                      "from glimr.train.cli import main\n"
                      "rc = main(sys.argv[1:])\n"
                      "print('rank', os.environ['RANK'], 'group open after train:', dist.is_initialized())\n"
                      "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(cfg_path), "run.progress=true"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = sorted(line for line in r.stdout.splitlines() if line.startswith("rank "))
    assert ranks == [f"rank {i} group open after train: False" for i in (0, 1)]
    assert "world size 2" in r.stderr
    log = _log(tmp_path / "ddp")
    assert log[-1]["step"] == 4                         # 4 batches per epoch shared by 2 ranks: 2 steps/epoch
    assert build_model(checkpoint=tmp_path / "ddp" / "model.safetensors").dim == 64


def test_real_views_train_with_pca_initialised_gem_whitening(photo_dir, shared_data, tmp_path):
    """data.kind=views (real_view of each photo + webcam place classes) builds its cache and trains; with
    optim.init_whiten=pca the GeM head's FC starts as the PCA-whitening of the cached items' GeM vectors,
    checked against the formula computed here (eigendecomposition of their covariance, numpy, fp64)."""
    from glimr.models.pooling import l2n
    from glimr.train.cache import FeatureCache

    places = tmp_path / "places"
    for cam in sorted((shared_data / "train-real" / "webcam").iterdir())[:2]:
        (places / cam.name).mkdir(parents=True)
        for f in sorted(cam.glob("*.jpg"))[:3]:
            os.symlink(f, places / cam.name / f.name)
    cfg = _cfg(photo_dir, tmp_path / "v", tmp_path / "vc", head_kwargs={"dim": 16},
               data={"kind": "views", "photos": [str(photo_dir)], "groups": str(places), "clean_first": 0},
               cache={"views_per_class": 2}, optim={"epochs": 1, "lr": 1e-12, "init_whiten": "pca",
                                                    "init_shrink": 0.5, "classifier_lr_mult": 1.0})
    summary = train(config_from_dict(cfg))
    cache = FeatureCache(tmp_path / "vc")
    assert cache.meta["kind"] == "views" and len(cache) == 8 * 2 + 6
    assert sorted(set(cache.labels.tolist())) == list(range(10))          # 8 photos + 2 webcams
    net = build_model(checkpoint=tmp_path / "v" / "model.safetensors")
    assert summary["steps"] >= 1 and net.head.norm_before_whiten
    with torch.no_grad():
        g = l2n(net.head.pool(cache.get("res5", list(range(len(cache)))).float())).double().numpy()
    mu = g.mean(0)
    lam, vec = np.linalg.eigh((g - mu).T @ (g - mu) / len(g))
    lam, vec = lam[::-1][:16], vec[:, ::-1][:, :16]
    proj = vec / np.sqrt(np.clip(lam, 0, None) + 0.5 * np.clip(lam, 0, None).mean())
    w = net.head.whiten.weight.detach().double().numpy()                  # (16, C): rows = P's columns
    b = net.head.whiten.bias.detach().double().numpy()
    assert np.allclose(np.abs(w), np.abs(proj.T), atol=1e-3 * np.abs(proj).max())   # up to each sign
    signs = np.sign((w * proj.T).sum(1))
    assert np.allclose(b, -(mu @ proj) * signs, atol=1e-3 * np.abs(b).max())
    with pytest.raises(TrainConfigError, match="init_whiten=pca .* cache.enabled"):
        validate(config_from_dict(_cfg(photo_dir, tmp_path / "x", None, optim={"init_whiten": "pca"})))
    with pytest.raises(TrainConfigError, match="init_whiten must be none or pca"):
        validate(config_from_dict(_cfg(photo_dir, tmp_path / "x", None, optim={"init_whiten": "lw"})))
    with pytest.raises(TrainConfigError, match="data.groups is read by data.kind=views only"):
        validate(config_from_dict(_cfg(photo_dir, tmp_path / "x", None, data={"groups": str(places)})))
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        train(config_from_dict(_cfg(photo_dir, tmp_path / "y", tmp_path / "yc",
                                    data={"kind": "views", "photos": [str(tmp_path / "nope")]})))


def test_real_views_refuse_a_benchmark(shared_data, tmp_path):
    """data.kind=views never trains on an evaluation set (a folder with gnd.json) or UKBench."""
    for bench in (shared_data / "real-dev", shared_data / "ukbench"):
        cfg = _cfg(tmp_path, tmp_path / "b", tmp_path / "bc",
                   data={"kind": "views", "photos": [str(bench)], "clean_first": 0})
        with pytest.raises(TrainConfigError, match="never (fit|train)|benchmark|evaluation set"):
            train(config_from_dict(cfg))
        assert not (tmp_path / "bc").exists()
