"""Queries over their own scale pyramid while the database stays at its scales: evaluate(), `glimr eval
--query-scales`, `glimr search --query-scales`, and a checkpoint's recommended `query_scales`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from glimr.eval import evaluate as E
from glimr.eval.cli import main as eval_main
from glimr.extract.multiscale import extract
from glimr.models.registry import build_model

SIZE = 128
QS = (1.0, 0.7071, 0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    """gnd.json folder: queries = view 0 of 3 UKBench objects; db = views 1-2 of each + 4 real photos."""
    root = tmp_path_factory.mktemp("qs") / "tiny-qs"
    (root / "query").mkdir(parents=True)
    (root / "db").mkdir()
    uk = shared_data / "ukbench"
    queries, db, positives = [], [], []
    for o in range(3):
        shutil.copy(uk / f"ukbench{4 * o:05d}.jpg", root / "query" / f"q{o}.jpg")
        queries.append(f"q{o}.jpg")
        positives.append([])
        for v in (1, 2):
            shutil.copy(uk / f"ukbench{4 * o + v:05d}.jpg", root / "db" / f"p{o}_{v}.jpg")
            positives[-1].append(len(db))
            db.append(f"p{o}_{v}.jpg")
    for i, p in enumerate(sorted((shared_data / "photos").glob("*.JPEG"))[:4]):
        shutil.copy(p, root / "db" / f"n{i}.jpg")
        db.append(f"n{i}.jpg")
    (root / "gnd.json").write_text(json.dumps({"query": queries, "db": db, "positives": positives}))
    return root


@pytest.fixture(scope="module")
def net():
    return build_model("gem-lite0")  # own instance: a test sets its recommended query scales


def _x(net, paths, scales, precision="fp32"):
    return extract(net, [str(p) for p in paths], scales=scales, max_size=SIZE, workers=0, progress=False,
                   precision=precision).descriptors


def test_evaluate_extracts_queries_and_database_at_their_own_scales(tiny, net, tmp_path):
    ev = E.load_eval_set(str(tiny))
    kw = dict(net=net, max_size=SIZE, workers=0, progress=False, keep=True, cache_dir=tmp_path / "cache",
              precision="fp32")
    rep = E.evaluate(str(tiny), scales="1", query_scales="1,0.7071,0.5", **kw)
    q_ms, q_1 = _x(net, ev.query_paths, QS), _x(net, ev.query_paths, (1.0,))
    assert np.allclose(rep.descriptors.q, q_ms, atol=1e-5)
    assert np.allclose(rep.descriptors.db, _x(net, ev.db_paths, (1.0,)), atol=1e-5)
    assert not np.allclose(q_ms, q_1, atol=1e-3)               # the pyramid does change the queries
    assert rep.meta["scales"] == [1.0] and rep.meta["query_scales"] == list(QS)
    assert "(queries 1,0.7071,0.5)" in rep.table()
    # the cache key holds the query scales: same settings come from the cache, plain ones do not
    again = E.evaluate(str(tiny), scales="1", query_scales=QS, **kw)
    assert again.meta["descriptors_cached"] and np.array_equal(again.descriptors.q, rep.descriptors.q)
    plain = E.evaluate(str(tiny), scales="1", **kw)
    assert not plain.meta["descriptors_cached"] and plain.meta["query_scales"] == [1.0]
    assert np.allclose(plain.descriptors.q, q_1, atol=1e-5)
    # the database-scales-only key is the old one: query_scales equal to scales changes nothing
    k_old = E.descriptor_cache_key({"m": 1}, ev, (1.0,), SIZE)
    assert E.descriptor_cache_key({"m": 1}, ev, (1.0,), SIZE, (1.0,)) == k_old
    assert E.descriptor_cache_key({"m": 1}, ev, (1.0,), SIZE, QS) != k_old
    # a model's recommended query scales are the default
    net.config["query_scales"] = list(QS)
    try:
        rec = E.evaluate(str(tiny), scales="1", **kw)
    finally:
        del net.config["query_scales"]
    assert rec.meta["query_scales"] == list(QS) and np.allclose(rec.descriptors.q, q_ms, atol=1e-5)


def test_same_images_sets_extract_queries_again_when_scales_differ(shared_data, net, tmp_path):
    sub = tmp_path / "ukb"
    sub.mkdir()
    for i in range(8):
        (sub / f"ukbench{i:05d}.jpg").symlink_to(shared_data / "ukbench" / f"ukbench{i:05d}.jpg")
    rep = E.evaluate("ukbench", root=sub, net=net, max_size=SIZE, workers=0, progress=False, keep=True,
                     query_scales="1,0.5", precision="fp32")
    paths = sorted(sub.iterdir())
    assert np.allclose(rep.descriptors.q, _x(net, paths, (1.0, 0.5)), atol=1e-5)
    assert np.allclose(rep.descriptors.db, _x(net, paths, (1.0,)), atol=1e-5)
    assert rep.meta["query_scales"] == [1.0, 0.5]


def test_cli_eval_query_scales(tiny, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert eval_main(["eval", str(tiny), "--max-size", str(SIZE), "--workers", "0", "--quiet", "--device", "cpu",
                      "--precision", "fp32", "--query-scales", "1", "0.7071", "0.5", "--json", str(out)]) == 0
    assert "(queries 1,0.7071,0.5)" in capsys.readouterr().out
    meta = json.loads(out.read_text())["meta"]
    assert meta["query_scales"] == list(QS) and meta["scales"] == [1.0]


def test_cli_search_query_scales(tiny, net, tmp_path, capsys):
    from glimr.cli import main
    from glimr.models.checkpoint import save_model

    ev = E.load_eval_set(str(tiny))
    db = {p.name: d for p, d in zip(ev.db_paths, _x(net, ev.db_paths, (1.0,), "fp32"))}
    query = ev.query_paths[0]

    def search(index, *extra):
        assert main(["search", str(index), str(query), "--json", "--top", "3", "--precision", "fp32", *extra]) == 0
        return json.loads(capsys.readouterr().out)["results"]

    def check(hits, q):
        for h in hits:
            assert abs(h["score"] - float(db[h["path"]] @ q)) < 1e-4

    idx = tmp_path / "idx"
    assert main(["index", "build", str(tiny / "db"), "--index", str(idx), "--model", "gem-lite0", "--max-size", str(SIZE),
                 "--workers", "0", "--precision", "fp32"]) == 0
    capsys.readouterr()
    check(search(idx, "--query-scales", "1,0.7071,0.5"), _x(net, [query], QS, "fp32")[0])
    check(search(idx), _x(net, [query], (1.0,), "fp32")[0])             # default: the index's scales
    assert main(["search", str(idx), str(query), "--rerank", "coattention", "--query-scales", "1,0.5"]) == 2
    assert "coattention" in capsys.readouterr().err
    # a checkpoint recommending query scales: search uses them unless told otherwise
    ck = tmp_path / "rec.safetensors"
    save_model(net, ck, prefixes=["head."], extra={"query_scales": list(QS)})
    idx2 = tmp_path / "idx2"
    assert main(["index", "build", str(tiny / "db"), "--index", str(idx2), "--checkpoint", str(ck),
                 "--max-size", str(SIZE), "--workers", "0", "--precision", "fp32"]) == 0
    capsys.readouterr()
    check(search(idx2), _x(net, [query], QS, "fp32")[0])
    check(search(idx2, "--query-scales", "1"), _x(net, [query], (1.0,), "fp32")[0])
