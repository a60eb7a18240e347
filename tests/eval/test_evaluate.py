"""Dataset-level evaluation, `glimr eval` and `glimr bench`, on real images with the real model.

The gnd.json dataset is built in tmp_path from real UKBench views and real photos (the Clutter-UKB
layout, without the clutter). The Revisited pipeline is checked on the real ground truth with every
image name pointing at a real Oxford image, and descriptors from an oracle (1000s of images are too
many for a unit test): what is tested there is the protocol plumbing (query boxes reach the extractor,
cropping is reported, the three protocols come out).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import glimr.extract.multiscale as multiscale
from glimr.data.gndjson import load_gnd_json
from glimr.data.revisited import load_gnd
from glimr.data.ukbench import load_ukbench
from glimr.eval import evaluate as E
from glimr.eval import metrics as M
from glimr.eval.bench import load_config, render_markdown, run_bench
from glimr.eval.cli import main, register

N_OBJ = 5
SIZE = 160  # small images keep the real model fast on CPU


@pytest.fixture(scope="module")
def tiny_gnd(tmp_path_factory, shared_data):
    """gnd.json folder: queries = view 0 of 5 UKBench objects; db = views 1-3 of each + 8 real photos."""
    root = tmp_path_factory.mktemp("tiny") / "tiny-ukb"
    (root / "query").mkdir(parents=True)
    (root / "db").mkdir()
    uk = shared_data / "ukbench"
    queries, db, positives = [], [], []
    for o in range(N_OBJ):
        qn = f"q{o}.jpg"
        shutil.copy(uk / f"ukbench{4 * o:05d}.jpg", root / "query" / qn)
        queries.append(qn)
        positives.append([])
        for v in (1, 2, 3):
            n = f"p{o}_{v}.jpg"
            shutil.copy(uk / f"ukbench{4 * o + v:05d}.jpg", root / "db" / n)
            positives[-1].append(len(db))
            db.append(n)
    photos = sorted((shared_data / "photos").iterdir())[:8]
    for i, p in enumerate(photos):
        n = f"n{i}{p.suffix}"
        shutil.copy(p, root / "db" / n)
        db.append(n)
    (root / "gnd.json").write_text(json.dumps({"query": queries, "db": db, "positives": positives}))
    return root


@pytest.fixture(scope="module")
def net():
    return E.build_net("gem-lite0", device="cpu")


@pytest.fixture
def same_net(net, monkeypatch):
    """The CLI and bench build their model by name: hand them the one already built (same model)."""
    import glimr.eval.bench as bench

    def build(name="gem-lite0", checkpoint=None, weights="pretrained", device="auto"):
        assert name == "gem-lite0" and checkpoint is None
        return net

    monkeypatch.setattr(E, "build_net", build)
    monkeypatch.setattr(bench, "build_net", build)
    return net


# ------------------------------------------------------------------------------------------ loaders
def test_gnd_json_and_ukbench_loaders(tiny_gnd, shared_data, tmp_path):
    ds = load_gnd_json(tiny_gnd)
    assert ds.n_queries == N_OBJ and ds.n_db == 3 * N_OBJ + 8 and ds.positives[1] == [3, 4, 5]
    es = E.load_eval_set(str(tiny_gnd))
    assert es.kind == "gnd.json" and es.relevant(2) == ({6, 7, 8}, set())
    assert E.load_eval_set("tiny-ukb", root=tiny_gnd.parent).name == "tiny-ukb"
    bad = tmp_path / "bad"
    shutil.copytree(tiny_gnd, bad)
    data = json.loads((bad / "gnd.json").read_text())
    data["positives"][0] = [99]
    (bad / "gnd.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="outside"):
        load_gnd_json(bad)
    uk = load_ukbench(shared_data / "ukbench")
    assert len(uk) == 300 and uk.n_objects == 75 and uk.objects[7] == 1
    es = E.load_eval_set("ukbench", root=shared_data / "ukbench")
    assert es.same_images and es.relevant(5) == ({4, 5, 6, 7}, set())
    with pytest.raises(E.EvalError, match="unknown dataset"):
        E.load_eval_set("no-such-set")
    with pytest.raises(E.EvalError, match="does not exist.*build_clutter_dev"):
        E.load_eval_set(str(tmp_path / "bench-data" / "clutter-dev-medium"))
    with pytest.raises(E.EvalError, match="holds no gnd.json"):
        E.load_eval_set(str(tmp_path))


# ------------------------------------------------------------------------------------ real model
def test_evaluate_real_model_on_gnd_json(tiny_gnd, net, tmp_path):
    rep = E.evaluate(str(tiny_gnd), net=net, max_size=SIZE, workers=0, progress=False, precision="fp32", keep=True,
                     cache_dir=tmp_path / "cache")
    assert set(rep.metrics) == {"mAP", "mP@1", "mP@3"}
    # clean UKBench views vs unrelated photos: ImageNet GeM finds most of them
    assert rep.metrics["mAP"] > 60 and rep.metrics["mP@1"] >= 60
    d = rep.descriptors
    assert d.q.shape == (N_OBJ, net.dim) and d.db.shape == (3 * N_OBJ + 8, net.dim)
    assert np.allclose(np.linalg.norm(d.db, axis=1), 1, atol=1e-4)
    # the metric is the one of glimr.eval.metrics on the inner-product ranking
    ranks = np.argsort(-(d.db @ d.q.T), axis=0, kind="stable")
    assert np.array_equal(rep.ranks, ranks)
    assert rep.metrics == M.gnd_json_map(ranks, load_gnd_json(tiny_gnd).positives)
    assert rep.meta["max_size"] == SIZE and not rep.meta["descriptors_cached"]
    # second time from the cache, same numbers
    again = E.evaluate(str(tiny_gnd), net=net, max_size=SIZE, workers=0, progress=False, precision="fp32",
                       cache_dir=tmp_path / "cache")
    assert again.meta["descriptors_cached"] and again.metrics == rep.metrics
    # a re-ranker from the registry gets the descriptors and the ranking
    seen = {}

    def reverse(q_desc, db_desc, ranks, flip=True):
        seen.update(q=q_desc.shape, db=db_desc.shape, flip=flip)
        return ranks[::-1] if flip else ranks

    E.RERANKERS["test-reverse"] = reverse
    try:
        worse = E.evaluate(str(tiny_gnd), net=net, max_size=SIZE, workers=0, progress=False, precision="fp32",
                           cache_dir=tmp_path / "cache", rerank="test-reverse:flip=true")
    finally:
        del E.RERANKERS["test-reverse"]
    assert seen == {"q": (N_OBJ, net.dim), "db": (3 * N_OBJ + 8, net.dim), "flip": True}
    assert worse.metrics["mAP"] < rep.metrics["mAP"] and worse.meta["rerank"] == "test-reverse:flip=true"


def test_cli_eval_writes_json(tiny_gnd, same_net, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["eval", "--model", "gem-lite0", str(tiny_gnd), "--max-size", str(SIZE), "--workers", "0", "--quiet",
               "--precision", "fp32", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed and "mP@3" in printed and "tiny-ukb" in printed
    data = json.loads(out.read_text())
    assert {"mAP", "mP@1", "mP@3"} <= set(data) and data["meta"]["model"] == "gem-lite0"
    assert 0 <= data["mAP"] <= 100


def test_cli_ukbench_ns(shared_data, same_net, tmp_path, capsys):
    # UKBench alone is easy: off-the-shelf GeM finds nearly all 4 views. 8 objects keep it short.
    sub = tmp_path / "ukb"
    sub.mkdir()
    for i in range(32):
        os.symlink(shared_data / "ukbench" / f"ukbench{i:05d}.jpg", sub / f"ukbench{i:05d}.jpg")
    out = tmp_path / "ukb.json"
    assert main(["eval", "--model", "gem-lite0", "ukbench", "--root", str(sub), "--max-size", str(SIZE), "--workers", "0", "--quiet",
                 "--precision", "fp32", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert 3.0 < data["N-S"] <= 4.0 and "N-S" in capsys.readouterr().out


def _bench_head(title: str, tmp_path, datasets: dict[str, object]) -> str:
    """The start of a fp32 bench config writing under tmp_path: title, output, cache, size, datasets by label."""
    sets = "".join(f"  - {{name: {folder}, label: {label}}}\n" for label, folder in datasets.items())
    return (f"title: {title}\noutput: {tmp_path / 'out'}\ncache: {tmp_path / 'cache'}\nmax_size: {SIZE}\n"
            f"workers: 0\nprecision: fp32\ndatasets:\n{sets}models: [gem-lite0]\n")


def test_bench_writes_tables_json_and_plots(tiny_gnd, same_net, tmp_path):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(_bench_head("tiny bench", tmp_path, {"Tiny": tiny_gnd}) + """scales: ["1"]
rerank: [none]
plots: {grids: true, grid_queries: 2, grid_topk: 3}
""")
    res = run_bench(load_config(cfg), progress=False, quiet=True)
    out = tmp_path / "out"
    md = (out / "results.md").read_text()
    assert md.startswith("# tiny bench") and "| Method | Scales | Re-rank | Tiny mAP |" in md
    run = res["runs"][0]
    assert f"**{run['metrics']['mAP']:.2f}**" not in md  # one method: nothing to bold
    assert f"{run['metrics']['mAP']:.2f}" in md and "glimr bench" in md
    assert json.loads((out / "results.json").read_text())["runs"][0]["metrics"] == run["metrics"]
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["grid_Tiny__gem-lite0_s1.jpg", "map_Tiny.png"]
    assert all((out / "plots" / p).stat().st_size > 5000 for p in plots)
    assert "![Tiny: ranked results of gem-lite0 s1](plots/grid_Tiny__gem-lite0_s1.jpg)" in md
    # the cost table: 1280-d float32 = 5120 bytes, images/s = (queries + database) / extraction seconds
    n_img = run["meta"]["n_queries"] + run["meta"]["n_db"]
    ips = n_img / run["meta"]["extract_seconds"]
    ms = 1000 * run["meta"]["rank_seconds"] / run["meta"]["n_queries"]
    assert f"| gem-lite0 | 1 | none | 1280 | 5120 | {ips:.1f} (Tiny) | {ms:.1f} (Tiny) |" in md
    # a second run reuses the cached descriptors; the markdown is re-rendered from the JSON alone
    res2 = run_bench(load_config(cfg), progress=False, quiet=True, plots=False)
    assert res2["runs"][0]["meta"]["descriptors_cached"] and res2["runs"][0]["metrics"] == run["metrics"]
    md2 = render_markdown(res2)
    assert "| cached |" in md2 and f"| 5120 | {ips:.1f} (Tiny, cached) |" in md2   # the cache keeps the time


def test_bench_runs_a_reranker_on_the_datasets_it_names(tiny_gnd, same_net, tmp_path):
    """A costly re-ranker can be limited to some datasets: it runs there only, and leaves "-" elsewhere."""
    cfg = tmp_path / "bench.yaml"
    head = _bench_head("limited", tmp_path, {"A": tiny_gnd, "B": tiny_gnd})
    cfg.write_text(head + "rerank: [none, {spec: alpha-qe, datasets: [B]}]\nplots: {grids: false}\n")
    res = run_bench(load_config(cfg), progress=False, quiet=True)
    done = [(r["dataset_label"], r["method"]["rerank"]) for r in res["runs"]]
    assert done == [("A", "none"), ("B", "none"), ("B", "alpha-qe")]
    qe = next(r for r in res["runs"] if r["method"]["rerank"] == "alpha-qe")
    row = next(line for line in render_markdown(res).splitlines() if line.startswith("| gem-lite0 | 1 | alpha-qe"))
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    assert cells[3:] == ["-", f"{qe['metrics']['mAP']:.2f}"]
    for bad, what in (("[{spec: alpha-qe, datasets: [C]}]", "names dataset(s) ['C']"),
                      ("[{datasets: [A]}]", "a mapping with 'spec'"), ("[{spec: nope}]", "nope")):
        cfg.write_text(head + f"rerank: {bad}\n")
        with pytest.raises(ValueError, match=re.escape(what)):
            run_bench(load_config(cfg), progress=False, quiet=True)


# ------------------------------------------------------------------------------ Revisited plumbing
@pytest.fixture(scope="module")
def roxford_root(tmp_path_factory, shared_data):
    """ROxford5k's layout with every listed name linked to one real sample image."""
    root = tmp_path_factory.mktemp("rox")
    jpg = root / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    rev = shared_data / "revisited"
    shutil.copy(rev / "gnd_roxford5k.pkl", root / "roxford5k")
    d = load_gnd(rev / "gnd_roxford5k.pkl")
    target = rev / "oxford-sample" / "bodleian_000132.jpg"
    for n in d["qimlist"] + d["imlist"]:
        src = rev / "oxford-sample" / f"{n}.jpg"
        os.symlink(src if src.exists() else target, jpg / f"{n}.jpg")
    return root


def oracle_extract(gnd, calls):
    """Descriptors that rank every query's easy+hard images first (perfect under all protocols)."""
    names_q = {n: j for j, n in enumerate(gnd["qimlist"])}
    nq = len(names_q)
    db_vec = np.zeros((len(gnd["imlist"]), nq), np.float32)
    for j, g in enumerate(gnd["gnd"]):
        db_vec[np.concatenate([g["easy"], g["hard"]]), j] = 1
    db_vec /= np.maximum(np.linalg.norm(db_vec, axis=1, keepdims=True), 1e-12)

    def extract(model, paths, *, scales=(1.0,), max_size=512, boxes=None, batch_size=16, workers=2,
                progress=True, desc="extract", precision="auto"):
        calls.append({"n": len(paths), "boxes": boxes, "max_size": max_size, "scales": scales,
                      "precision": precision})
        stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
        if stems[0] in names_q:
            out = np.eye(nq, dtype=np.float32)[[names_q[s] for s in stems]]
        else:
            out = db_vec
        return SimpleNamespace(descriptors=out, errors={})

    return extract


def test_revisited_pipeline_crops_queries_and_reports_protocols(roxford_root, monkeypatch, tmp_path, capsys):
    gnd = load_gnd(roxford_root / "roxford5k" / "gnd_roxford5k.pkl")
    calls = []
    monkeypatch.setattr(multiscale, "extract", oracle_extract(gnd, calls))
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", "gem-lite0", "roxford5k", "--root", str(roxford_root), "--scales", "0.7071", "1", "1.4142",
               "--json", str(out), "--quiet"])
    assert rc == 0
    q_call = next(c for c in calls if c["n"] == 70)
    assert q_call["boxes"] == [g["bbx"] for g in gnd["gnd"]]  # the protocol's query crops reach the extractor
    assert q_call["max_size"] == 1024 and q_call["scales"] == (0.7071, 1.0, 1.4142)
    printed = capsys.readouterr().out
    assert "ROxford5k (Revisited" in printed and "cropped to their ground-truth box" in printed
    assert "2 of 70 queries have no positives" in printed
    data = json.loads(out.read_text())
    for proto in ("easy", "medium", "hard"):
        assert data[proto] == {k: pytest.approx(100.0) for k in ("mAP", "mP@1", "mP@5", "mP@10")}
    assert data["meta"]["crop"] is True and data["meta"]["n_db"] == 4993
    # --no-crop: no boxes, and the output says so
    calls.clear()
    with pytest.warns(UserWarning, match="NOT cropped"):
        assert main(["eval", "--model", "gem-lite0", "roxford5k", "--root", str(roxford_root), "--no-crop", "--quiet"]) == 0
    assert next(c for c in calls if c["n"] == 70)["boxes"] is None
    assert "NOT cropped" in capsys.readouterr().out


def test_revisited_needs_its_images(shared_data, capsys):
    rev = shared_data / "revisited"
    rc = main(["eval", "--model", "gem-lite0", "roxford5k", "--root", str(rev), "--images", str(rev / "oxford-sample"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "60 of 70 query images" in err and "revisitop" in err


# ------------------------------------------------------------------------------------------ pieces
def test_failed_images():
    es = E.EvalSet(name="t", title="t", kind="gnd.json", query_paths=["q0", "q1"],
                   db_paths=[f"d{i}" for i in range(4)],
                   query_boxes=None, score=lambda r: (M.gnd_json_map(r, [[0], [1]]), []),
                   relevant=lambda q: ({q}, set()))
    q = np.eye(2, 3, dtype=np.float32)
    db = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], np.float32)
    d = E.Descriptors(q=q, db=db, q_errors={}, db_errors={0: "corrupt"}, seconds=0.0)
    metrics, notes, ranks = E.score_descriptors(es, d)
    assert ranks[-1, 0] == 0 and metrics["mAP"] == pytest.approx((100 / 8 + 100) / 2)  # failed positive last
    assert "could not be read" in notes[0]
    d.q_errors = {1: "truncated"}
    with pytest.raises(E.EvalError, match="q1: truncated"):
        E.score_descriptors(es, d)


def test_rerank_specs():
    assert E.parse_rerank("none") == ("none", {})
    E.RERANKERS["x-test"] = E.rerank_none
    try:
        expected = ("x-test", {"k": 2, "alpha": 3.5, "mode": "fast"})
        assert E.parse_rerank("x-test:k=2,alpha=3.5,mode=fast") == expected
    finally:
        del E.RERANKERS["x-test"]
    with pytest.raises(ValueError, match="unknown re-ranker"):
        E.parse_rerank("nope")
    with pytest.raises(ValueError, match="key=value"):
        E.parse_rerank("none:oops")


def test_help_has_examples():
    import argparse

    parser = argparse.ArgumentParser(prog="glimr")
    sub = parser.add_subparsers()
    register(sub)
    for name in ("eval", "bench"):
        text = sub.choices[name].format_help()
        assert "example" in text and f"glimr {name} " in text


@pytest.mark.parametrize(("line", "what"), [("batch_size: 0", "batch_size: 0 is out of range"),
                                            ("workers: -1", "workers: -1 is out of range"),
                                            ("max_size: .nan", "max_size: nan is not an integer"),
                                            ("precision: fp16", "precision must be auto, fp32 or bf16"),
                                            ("plots: {grid_topk: 0}", "plots.grid_topk: 0 is out of range")])
def test_bench_config_numbers_are_checked_when_loaded(tmp_path, line, what):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(f"datasets: [x]\nmodels: [gem-lite0]\n{line}\n")
    with pytest.raises(ValueError) as e:
        load_config(cfg)
    assert what in str(e.value) and str(cfg) in str(e.value)


# ------------------------------------------------------------------------------ the model's own image size
def test_a_model_runs_at_its_own_size_unless_the_protocol_or_the_caller_fixes_one(tiny_gnd, roxford_root, net,
                                                                                   monkeypatch):
    """A model's config may carry "max_size" (the size its whitening was fitted at): evaluation uses it where
    the caller gives none; Revisited keeps its protocol's 1024; a model without one gets 512."""
    tiny, rox = E.load_eval_set(str(tiny_gnd)), E.load_eval_set("roxford5k", root=roxford_root)
    assert tiny.max_size_for(net) == 512 and rox.max_size_for(net) == 1024
    monkeypatch.setitem(net.config, "max_size", SIZE)
    assert tiny.max_size_for(net) == SIZE and rox.max_size_for(net) == 1024
    rep = E.evaluate(str(tiny_gnd), net=net, workers=0, progress=False, precision="fp32", keep=True)
    assert rep.meta["max_size"] == SIZE
    ref = E.evaluate(str(tiny_gnd), net=net, max_size=SIZE, workers=0, progress=False, precision="fp32", keep=True)
    assert np.array_equal(rep.descriptors.db, ref.descriptors.db)
    assert E.evaluate(str(tiny_gnd), net=net, max_size=96, workers=0, progress=False,
                      precision="fp32").meta["max_size"] == 96


def test_bench_runs_each_model_at_its_size_and_says_so(tiny_gnd, same_net, tmp_path):
    cfg = tmp_path / "bench.yaml"
    head = _bench_head("sizes", tmp_path, {"Tiny": tiny_gnd}).replace("models: [gem-lite0]\n", "")
    cfg.write_text(head + "models:\n  - {name: gem-lite0, label: small, max_size: 96}\n  - {name: gem-lite0, label: big}\n"
                   "plots: {grids: false}\n")
    res = run_bench(load_config(cfg), progress=False, quiet=True)
    assert [(r["method"]["label"], r["meta"]["max_size"]) for r in res["runs"]] == [("small", 96), ("big", SIZE)]
    md = render_markdown(res)
    assert "| Method | Scales | Max size | Re-rank | Tiny mAP |" in md
    assert "| small | 1 | 96 | none |" in md and f"| big | 1 | {SIZE} | none |" in md
    assert f"max size 96: small; {SIZE}: big." in md
    cfg.write_text(head + "models:\n  - {name: gem-lite0, max_size: 0}\n")
    with pytest.raises(ValueError, match=r"model gem-lite0: max_size: 0 is out of range"):
        load_config(cfg)
