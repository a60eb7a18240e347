"""Co-attention maps over candidate images (Fig. 7 of Hu & Bors 2023) and `glimr explain --query`."""
from __future__ import annotations

import numpy as np
from PIL import Image

from glimr.viz.cli import main


def test_coattention_maps(shared_data, lite0_gem, tmp_path):
    """Fig. 7-style maps: every selected location carries its cluster's weight a'_i, the rest is 0."""
    from glimr.viz.coattention_maps import coattention_maps, render_coattention

    ukb = shared_data / "ukbench"
    maps, qimg = coattention_maps(lite0_gem, ukb / "ukbench00004.jpg", [ukb / "ukbench00005.jpg",
                                                                        ukb / "ukbench00200.jpg"],
                                  scales=(1.0,), max_size=256, clusters=4, n_select=20)
    assert len(maps) == 2 and qimg.size == (256, 192)
    for m in maps:
        assert m.coattention.shape == (192, 256) == m.l2norm.shape
        assert np.isclose(m.weights.sum(), 1.0, atol=1e-5)
        # 20 of the 6 x 8 cells are selected: the rest is 0; a selected cell holds its cluster's weight
        assert 0.4 < (m.coattention == 0).mean() < 0.8
        vals = np.unique(m.coattention[m.coattention > 0])
        assert np.isclose(vals[:, None], m.weights[None], atol=1e-6).any(1).all()
    assert maps[0].score > maps[1].score                        # same object scores higher than another
    out = render_coattention(ukb / "ukbench00004.jpg", [ukb / "ukbench00005.jpg"], tmp_path / "ca.png",
                             model=lite0_gem, scales=(1.0,), max_size=128)
    assert out.is_file() and out.stat().st_size > 1000


def test_cli_query_draws_one_row_per_candidate(shared_data, tmp_path, capsys):
    ukb = shared_data / "ukbench"
    out = tmp_path / "ca.png"
    args = ["explain", "--query", str(ukb / "ukbench00004.jpg"), "--crop", "20,10,600,470",
            str(ukb / "ukbench00005.jpg"), str(ukb / "ukbench00006.jpg"), "--model", "gem-lite0", "--size", "128",
            "--out", str(out)]
    assert main(args) == 0
    assert "2 candidate(s)" in capsys.readouterr().out
    png = Image.open(out)
    assert png.format == "PNG" and png.height > png.width / 4 * 1.5     # four panels a row, two rows


def test_cli_query_errors_name_the_problem(shared_data, tmp_path, capsys):
    ukb = shared_data / "ukbench"
    q, c = str(ukb / "ukbench00004.jpg"), str(ukb / "ukbench00005.jpg")
    missing = tmp_path / "nope.jpg"
    assert main(["explain", "--query", q, str(missing), "--out", str(tmp_path / "x.png")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["explain", "--query", q, c, "--crop", "5,5,1,1", "--out", str(tmp_path / "x.png")]) == 2
    assert "--crop" in capsys.readouterr().err
    assert main(["explain", "--query", q, c, "--index", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "--coattention" in capsys.readouterr().err
    # several images without --query, or --crop without --query, are refused with a hint
    assert main(["explain", q, c, "--out", str(tmp_path / "x.png")]) == 2
    assert "--query" in capsys.readouterr().err
    assert main(["explain", q, "--crop", "0,0,9,9", "--out", str(tmp_path / "x.png")]) == 2
    assert "--query" in capsys.readouterr().err


def test_cli_query_with_an_index_uses_its_pca(shared_data, lite0_gem, tmp_path, capsys):
    import shutil

    from glimr.extract.local import LocalConfig
    from glimr.index.build import build_index

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(6):
        shutil.copy(shared_data / "ukbench" / f"ukbench{i:05d}.jpg", imgs)
    cfg = LocalConfig(n_select=40, clusters=3, dim=8, proxy_dim=8, codebook_size=16, codebook_dim=8, max_words=8,
                      dtype="float32")
    build_index(imgs, tmp_path / "idx", lite0_gem, model_name="gem-lite0", max_size=128, workers=0, progress=False,
                coattention=cfg, precision="fp32", ca_samples="database")
    out = tmp_path / "ca.png"
    assert main(["explain", "--query", str(imgs / "ukbench00004.jpg"), str(imgs / "ukbench00005.jpg"),
                 "--index", str(tmp_path / "idx"), "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"
