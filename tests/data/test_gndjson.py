"""gnd.json ground truth: every malformed entry is a GroundTruthError naming the file and the entry; names never
leave the dataset folder. Hand-written cases plus property-based ones (hypothesis)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glimr.data.gndjson import GroundTruthError, load_gnd_json


@pytest.fixture
def folder(shared_data, tmp_path) -> Path:
    """A real 2-query, 4-image dataset folder (UKBench views)."""
    root = tmp_path / "set"
    (root / "query").mkdir(parents=True)
    (root / "db").mkdir()
    uk = shared_data / "ukbench"
    for i in (0, 4):
        shutil.copy(uk / f"ukbench{i:05d}.jpg", root / "query")
    for i in (1, 2, 5, 6):
        shutil.copy(uk / f"ukbench{i:05d}.jpg", root / "db")
    return root


def _good() -> dict:
    return {"query": ["ukbench00000.jpg", "ukbench00004.jpg"],
            "db": ["ukbench00001.jpg", "ukbench00002.jpg", "ukbench00005.jpg", "ukbench00006.jpg"],
            "positives": [[0, 1], [2, 3]], "junk": [[], [0]], "bbx": [None, [10, 20, 300.5, 400]], "kappas": [1, 2]}


def test_a_valid_file_loads(folder):
    (folder / "gnd.json").write_text(json.dumps(_good()))
    ds = load_gnd_json(folder)
    assert ds.n_queries == 2 and ds.n_db == 4 and ds.positives == [[0, 1], [2, 3]] and ds.junk == [[], [0]]
    assert ds.query_boxes == [None, (10.0, 20.0, 300.5, 400.0)] and ds.extra == {"kappas": [1, 2]}
    assert ds.db_paths[2] == folder / "db" / "ukbench00005.jpg" and all(p.is_file() for p in ds.db_paths)


def _with(**kw) -> dict:
    d = _good()
    for k, v in kw.items():
        if v is KeyError:
            d.pop(k)
        else:
            d[k] = v
    return d


MALFORMED = [
    ("list at the top level", [1, 2], "top level must be an object"),
    ("missing db", _with(db=KeyError), "missing key 'db'"),
    ("missing positives", _with(positives=KeyError), "missing key 'positives'"),
    ("query is an int", _with(query=3), "'query' must be a non-empty list"),
    ("a query name is an int", _with(query=["ukbench00000.jpg", 7]), "query[1] must be an image name"),
    ("no queries", _with(query=[], positives=[], junk=None, bbx=None), "'query' must be a non-empty list"),
    ("positives out of range", _with(positives=[[0, 4], [2]]), "positives[0] has indices outside 0..3"),
    ("negative positive", _with(positives=[[-1], [2]]), "positives[0] has indices outside"),
    ("positives not per query", _with(positives=[[0]]), "one list of db indices per query (2)"),
    ("positive is a float", _with(positives=[[0.0], [2]]), "positives[0] must be a list of integers"),
    ("positive is a bool", _with(positives=[[True], [2]]), "positives[0] must be a list of integers"),
    ("positives is a dict", _with(positives={"0": [1]}), "'positives' must be a list"),
    ("repeated positive", _with(positives=[[1, 1], [2]]), "positives[0] lists db indices more than once"),
    ("positive and junk", _with(junk=[[1], []]), "query 0: db indices [1] are both positive and junk"),
    ("junk out of range", _with(junk=[[9], []]), "junk[0] has indices outside"),
    ("bbx short", _with(bbx=[None, [1, 2, 3]]), "bbx[1] must be null or [x0, y0, x1, y1]"),
    ("bbx string", _with(bbx=[None, "1,2,3,4"]), "bbx[1] must be null or"),
    ("bbx empty box", _with(bbx=[[5, 5, 5, 9], None]), "bbx[0] [5, 5, 5, 9] is empty"),
    ("bbx count", _with(bbx=[None]), "'bbx' must be a list with one entry per query (2)"),
    ("kappas zero", _with(kappas=[0]), "'kappas' must be a non-empty list of positive integers"),
    ("dot-dot name", _with(db=["../query/ukbench00000.jpg", "ukbench00002.jpg", "ukbench00005.jpg",
                               "ukbench00006.jpg"]), "db[0] '../query/ukbench00000.jpg' leaves the dataset folder"),
    ("absolute name", _with(query=["/etc/hostname", "ukbench00004.jpg"]), "query[0] '/etc/hostname' leaves"),
    ("windows drive", _with(query=["C:\\x.jpg", "ukbench00004.jpg"]), "query[0] 'C:\\\\x.jpg' leaves"),
    ("backslash dot-dot", _with(query=["..\\..\\x.jpg", "ukbench00004.jpg"]), "leaves the dataset folder"),
]


@pytest.mark.parametrize(("doc", "what"), [(d, w) for _, d, w in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_malformed_entries_name_the_file_and_the_entry(folder, doc, what):
    (folder / "gnd.json").write_text(json.dumps(doc))
    with pytest.raises(GroundTruthError) as e:
        load_gnd_json(folder)
    assert what in str(e.value) and str(folder / "gnd.json") in str(e.value) and "Fix gnd.json" in str(e.value)


@pytest.mark.parametrize(("raw", "what"), [(b"{\"query\": [", "not readable JSON"), (b"\xff\xfe{}", "not UTF-8"),
                                           (b"[" * 100000 + b"]" * 100000, "not readable JSON")])
def test_unreadable_bytes_are_a_ground_truth_error(folder, raw, what):
    (folder / "gnd.json").write_bytes(raw)
    with pytest.raises(GroundTruthError, match=what):
        load_gnd_json(folder)


def test_a_name_escaping_the_folder_is_refused_even_when_the_file_exists(folder):
    """'../query/x.jpg' from db/ exists on disk: it must be refused, not read."""
    secret = folder.parent / "outside.jpg"
    shutil.copy(folder / "query" / "ukbench00000.jpg", secret)
    doc = _with(db=["../../outside.jpg", "ukbench00002.jpg", "ukbench00005.jpg", "ukbench00006.jpg"])
    (folder / "gnd.json").write_text(json.dumps(doc))
    assert (folder / "db" / "../../outside.jpg").is_file()
    with pytest.raises(GroundTruthError, match="leaves the dataset folder"):
        load_gnd_json(folder)
    doc = _with(db=[str(secret), "ukbench00002.jpg", "ukbench00005.jpg", "ukbench00006.jpg"])
    (folder / "gnd.json").write_text(json.dumps(doc))
    with pytest.raises(GroundTruthError, match="leaves the dataset folder"):
        load_gnd_json(folder)


def test_missing_images_name_them(folder):
    (folder / "gnd.json").write_text(json.dumps(_with(db=["nope.jpg", "ukbench00002.jpg", "ukbench00005.jpg",
                                                          "ukbench00006.jpg"])))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_gnd_json(folder)


# ------------------------------------------------------------------------------------ property-based
JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10) | st.floats(allow_nan=True) | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                    max_leaves=12)
GOOD_NAMES = ["a.jpg", "b/c.jpg", "ok.png", "d e.jpg", "x..y.jpg"]
BAD_NAMES = ["../x.jpg", "/abs.jpg", "", " ", "C:\\d.jpg", "a\0b", "..", "b/../../c.jpg"]
NAME = st.sampled_from(GOOD_NAMES * 8 + BAD_NAMES)     # mostly good names
RARELY = st.sampled_from([False] * 11 + [True])         # a breakage in about 1 of 12 fields
BAD_INDEX = st.integers(-2, 6) | st.booleans() | st.floats(-1, 6) | st.text(max_size=2)


def _indices(n_db: int):
    good = st.lists(st.integers(0, n_db - 1), max_size=3, unique=True) if n_db else st.just([])
    return st.one_of(good, good, good, st.lists(BAD_INDEX, max_size=4))


@st.composite
def near_valid_docs(draw):
    """gnd.json documents close to valid ones: right keys, mostly right types, random breakage."""
    n_q, n_db = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    indices = _indices(n_db)
    box = (st.none() | st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(60, 99), st.integers(60, 99))
           .map(list) | st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 500), max_size=5))

    def field(good):        # mostly the right shape, sometimes any JSON value
        return draw(JSON if draw(RARELY) else good)

    doc = {"query": field(st.lists(NAME, min_size=n_q, max_size=n_q)),
           "db": field(st.lists(NAME, min_size=n_db, max_size=n_db)),
           "positives": field(st.lists(indices, min_size=n_q, max_size=n_q))}
    if draw(st.booleans()):
        doc["junk"] = field(st.lists(st.just([]) | indices, min_size=n_q, max_size=n_q))
    if draw(st.booleans()):
        doc["bbx"] = field(st.lists(box, min_size=n_q, max_size=n_q))
    if draw(st.booleans()):
        doc["kappas"] = field(st.lists(st.integers(-1, 5), max_size=3))
    if draw(RARELY):
        doc.pop(draw(st.sampled_from(sorted(doc))))
    return doc


def _check_valid(ds) -> None:
    n_q, n_db = ds.n_queries, ds.n_db
    assert n_q >= 1 and n_db >= 1 and len(ds.positives) == n_q
    for lists in (ds.positives, ds.junk or []):
        assert all(isinstance(j, int) and 0 <= j < n_db for p in lists for j in p)
    for p in ds.query_paths:
        assert p.parent == ds.root / "query" or ds.root / "query" in p.parents
        assert ".." not in p.relative_to(ds.root).parts
    for p in ds.db_paths:
        assert ds.root / "db" in p.parents and ".." not in p.relative_to(ds.root).parts
    if ds.query_boxes is not None:
        assert all(b is None or (b[2] > b[0] and b[3] > b[1]) for b in ds.query_boxes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=near_valid_docs() | JSON)
def test_any_document_is_a_dataset_or_a_ground_truth_error(tmp_path, doc):
    (tmp_path / "gnd.json").write_text(json.dumps(doc))
    try:
        ds = load_gnd_json(tmp_path, check_files=False)
    except GroundTruthError as e:
        assert str(tmp_path / "gnd.json") in str(e)
        return
    _check_valid(ds)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_random_bytes_are_a_ground_truth_error(tmp_path, raw):
    (tmp_path / "gnd.json").write_bytes(raw)
    with pytest.raises(GroundTruthError, match="gnd.json"):
        load_gnd_json(tmp_path, check_files=False)
