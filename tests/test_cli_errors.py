"""Every command ends with its result or ONE error line and a non-zero status, never a traceback: bad datasets,
malformed gnd.json and checkpoints, out-of-range numbers (checked before any work or write), internal errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glimr.cli import main, run_command

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(err: str, prefix: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.fixture
def tiny_set(shared_data, tmp_path) -> Path:
    root = tmp_path / "tiny"
    (root / "query").mkdir(parents=True)
    (root / "db").mkdir()
    shutil.copy(shared_data / "ukbench" / "ukbench00000.jpg", root / "query")
    for i in (1, 2):
        shutil.copy(shared_data / "ukbench" / f"ukbench{i:05d}.jpg", root / "db")
    (root / "gnd.json").write_text(json.dumps({"query": ["ukbench00000.jpg"], "db": ["ukbench00001.jpg",
                                                                                     "ukbench00002.jpg"],
                                               "positives": [[0, 1]]}))
    return root


def test_eval_of_an_unknown_set_is_one_line_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}          # this checkout's glimr, from any folder
    env.pop("GLIMR_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "glimr.cli", "eval", "nosuchset"], cwd=tmp_path, env=env, check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    line = _one_error_line(r.stderr, "glimr eval: error: unknown dataset 'nosuchset'")
    assert "roxford5k" in line        # what to do


@pytest.mark.parametrize(("gnd", "what"), [
    ([1, 2], "top level must be an object"),
    ({"query": [3], "db": ["ukbench00001.jpg"], "positives": [[0]]}, "query[0] must be an image name"),
    ({"query": ["ukbench00000.jpg"], "db": ["ukbench00001.jpg"], "positives": [[5]]}, "positives[0] has indices"),
    ({"query": ["ukbench00000.jpg"], "db": ["ukbench00001.jpg"]}, "missing key 'positives'"),
    ({"query": ["../db/ukbench00001.jpg"], "db": ["ukbench00001.jpg"], "positives": [[0]]}, "leaves the dataset"),
])
def test_eval_of_a_malformed_gnd_json_is_one_line_naming_the_file(tiny_set, capsys, gnd, what):
    (tiny_set / "gnd.json").write_text(json.dumps(gnd))
    assert main(["eval", str(tiny_set), "--model", "gem-lite0", "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err, "glimr eval: error: ")
    assert str(tiny_set / "gnd.json") in line and what in line


def test_the_eval_module_entry_point_gives_the_same_line(capsys):
    from glimr.eval.cli import main as eval_main

    assert eval_main(["eval", "nosuchset"]) == 2
    _one_error_line(capsys.readouterr().err, "glimr eval: error: unknown dataset")


def test_eval_with_a_malformed_checkpoint_sidecar(tiny_set, lite0_gem, tmp_path, capsys):
    from glimr.models.checkpoint import save_model

    save_model(lite0_gem, tmp_path / "ck.v2.safetensors", prefixes=["head."])
    (tmp_path / "ck.v2.json").write_text('["not", "an", "object"]')
    assert main(["eval", str(tiny_set), "--checkpoint", str(tmp_path / "ck.v2.safetensors"), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err, "glimr eval: error: ")
    assert "ck.v2.json" in line and "not an object" in line


@pytest.mark.parametrize(("args", "what"), [
    (["--max-size", "0"], "argument --max-size: 0 is out of range"),
    (["--max-size", "nan"], "argument --max-size: 'nan' is not an integer"),
    (["--batch-size", "-3"], "argument --batch-size: -3 is out of range"),
    (["--workers", "-1"], "argument --workers: -1 is out of range: use an integer >= 0"),
    (["--workers", "two"], "argument --workers: 'two' is not an integer"),
])
def test_eval_numbers_are_checked_before_any_work(tiny_set, tmp_path, capsys, args, what):
    out = tmp_path / "m.json"
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny_set), "--json", str(out), "--cache", str(tmp_path / "cache"), *args])
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err, f"glimr eval: error: {what}")
    assert line.endswith("(see glimr eval --help)")
    assert not out.exists() and not (tmp_path / "cache").exists()


def _train_cfg(shared_data, tmp_path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((shared_data / "photos").glob("*.JPEG"))[:2]:
        (photos / p.name).symlink_to(p)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({"model": "gem-lite0", "data": {"kind": "composites", "photos": str(photos)},
                                   "run": {"out": str(tmp_path / "run"), "progress": False}}))
    return cfg


@pytest.mark.parametrize(("override", "what"), [
    ("optim.lr=.nan", "optim.lr: nan is not a finite number"),
    ("optim.lr=fast", "optim.lr: 'fast' is not a number"),
    ("optim.lr=-0.1", "optim.lr: -0.1 is out of range: use a finite number > 0"),
    ("optim.epochs=0", "optim.epochs: 0 is out of range"),
    ("optim.epochs=ten", "optim.epochs: 'ten' is not an integer"),
    ("optim.momentum=1", "optim.momentum: 1 is out of range: use a finite number in [0.0, 1.0)"),
    ("optim.grad_clip=.inf", "optim.grad_clip: inf is not a finite number"),
    ("run.workers=-2", "run.workers: -2 is out of range"),
    ("data.p_clean=1.5", "data.p_clean: 1.5 is out of range"),
    ("data.paste_scale=[0.7,0.2]", "data.paste_scale must be [low, high] with low <= high"),
    ("data.crop_area=0.5", "data.crop_area must be a pair"),
    ("optim.nesterov=3", "optim.nesterov must be true or false"),
])
def test_train_settings_are_checked_before_any_work_or_write(shared_data, tmp_path, capsys, override, what):
    cfg = _train_cfg(shared_data, tmp_path)
    assert main(["train", str(cfg), override]) == 2
    line = _one_error_line(capsys.readouterr().err, "glimr train: error: ")
    assert what in line, line
    assert not (tmp_path / "run").exists()


def test_train_print_config_still_works(shared_data, tmp_path, capsys):
    cfg = _train_cfg(shared_data, tmp_path)
    assert main(["train", str(cfg), "optim.lr=1", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 1.0 and isinstance(printed["optim"]["lr"], float)


def test_an_internal_error_is_one_line_unless_debugging(capsys, monkeypatch):
    def buggy(args):
        return {}["missing"]

    monkeypatch.delenv("GLIMR_DEBUG", raising=False)
    assert run_command(buggy, None, "models") == 1
    line = _one_error_line(capsys.readouterr().err, "glimr models: internal error: KeyError: 'missing'")
    assert line.endswith("(set GLIMR_DEBUG=1 for the traceback)")
    monkeypatch.setenv("GLIMR_DEBUG", "1")
    with pytest.raises(KeyError):
        run_command(buggy, None, "models")


def test_a_multi_line_message_stays_on_one_line(capsys):
    def fails(args):
        raise ValueError("first line\nsecond line")

    assert run_command(fails, None, "extract") == 2
    assert _one_error_line(capsys.readouterr().err, "glimr extract: error:") == \
        "glimr extract: error: first line second line"


@pytest.mark.parametrize("args", [["--size", "0"], ["--max-pixels", "-5"], ["--size", "1e9"]])
def test_explain_numbers_are_checked_before_any_work(shared_data, tmp_path, capsys, args):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as e:
        main(["explain", str(shared_data / "ukbench" / "ukbench00000.jpg"), "--out", str(out), *args])
    assert e.value.code == 2 and not out.exists()
    _one_error_line(capsys.readouterr().err, f"glimr explain: error: argument {args[0]}:")


def test_an_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["nosuch"])
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err, "glimr: error: argument COMMAND: invalid choice: 'nosuch'")
    assert "eval" in line and line.endswith("(see glimr --help)")


@pytest.mark.parametrize(("spec", "what"), [("alpha-qe:alpha=nan", "alpha=nan is not a finite number"),
                                            ("alpha-qe:alpha=-inf", "alpha=-inf is not a finite number"),
                                            ("nosuch", "unknown re-ranker 'nosuch'"),
                                            ("alpha-qe:k", "parameters are key=value")])
def test_eval_rerank_specs_are_checked_before_any_work(tiny_set, tmp_path, capsys, spec, what):
    assert main(["eval", str(tiny_set), "--rerank", spec, "--cache", str(tmp_path / "cache"), "--quiet"]) == 2
    assert what in _one_error_line(capsys.readouterr().err, "glimr eval: error: ")
    assert not (tmp_path / "cache").exists()
