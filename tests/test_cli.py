"""The CLI forms other tools call (a contract: keep stable)."""
import json
import shutil
import subprocess
import sys

import numpy as np

from glimr.cli import main


def _imgs(shared_data, dst, idx):
    dst.mkdir(parents=True, exist_ok=True)
    for i in idx:
        shutil.copy(shared_data / "ukbench" / f"ukbench{i:05d}.jpg", dst / f"ukbench{i:05d}.jpg")
    return dst


def test_models_lists_the_default(capsys):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [m["name"] for m in out["models"]]
    assert out["default"] in names and "gem-lite0" in names and "gem-resnet50" in names


def test_extract_writes_names_and_normalised_descriptors(shared_data, tmp_path, capsys):
    imgs = _imgs(shared_data, tmp_path / "imgs", range(4))
    (imgs / "deep").mkdir()
    shutil.copy(shared_data / "ukbench" / "ukbench00010.jpg", imgs / "deep" / "x.jpg")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "d.npz"
    assert main(["extract", str(imgs), "--out", str(out), "--scales", "1,0.7071,1.4142", "--max-size", "200",
                 "--workers", "0", "--precision", "fp32"]) == 0
    assert "1 unreadable" in capsys.readouterr().out
    with np.load(out, allow_pickle=False) as z:
        names, d = list(z["names"]), z["descriptors"]
    assert names == ["deep/x.jpg"] + [f"ukbench{i:05d}.jpg" for i in range(4)]
    from glimr.models.registry import DEFAULT_MODEL, build_model

    assert d.dtype == np.float32 and d.shape == (5, build_model(DEFAULT_MODEL).dim)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)


def test_index_build_and_search_json_with_crop(shared_data, tmp_path, capsys):
    imgs = _imgs(shared_data, tmp_path / "imgs", range(16))
    assert main(["index", "build", str(imgs), "--index", str(tmp_path / "idx"), "--max-size", "256",
                 "--workers", "0"]) == 0
    assert "16 images searchable" in capsys.readouterr().out
    q = shared_data / "ukbench" / "ukbench00009.jpg"
    assert main(["search", str(tmp_path / "idx"), str(q), "--top", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in res["results"]] == [1, 2, 3, 4]
    assert res["results"][0]["path"] == "ukbench00009.jpg"
    assert sum(int(r["path"][7:12]) // 4 == 2 for r in res["results"]) >= 3
    assert main(["search", str(tmp_path / "idx"), str(q), "--crop", "100,80,540,400", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["crop"] == [100, 80, 540, 400] and res["results"][0]["path"] in {
        f"ukbench{i:05d}.jpg" for i in range(8, 12)}


def test_errors_name_the_file_and_exit_2(shared_data, tmp_path, capsys):
    assert main(["search", str(tmp_path / "nothing"), str(shared_data / "ukbench" / "ukbench00000.jpg")]) == 2
    assert "not a glimr index" in capsys.readouterr().err
    imgs = _imgs(shared_data, tmp_path / "imgs", range(2))
    main(["index", "build", str(imgs), "--index", str(tmp_path / "idx"), "--max-size", "128", "--workers", "0"])
    capsys.readouterr()
    bad = tmp_path / "q.jpg"
    bad.write_text("no")
    assert main(["search", str(tmp_path / "idx"), str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["extract", str(imgs), "--out", str(tmp_path / "x.npz"), "--model", "nope-lite0"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_demo_runs_offline_and_finds_the_scene(tmp_path):
    r = subprocess.run([sys.executable, "-m", "glimr.cli", "demo", "--out", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "4 of the top 4 are views of the query's scene" in r.stdout
