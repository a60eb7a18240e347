"""Flagging rules of glimr.audit.overlap on hand-written verified pairs (checked against a direct count), and the
settings' validation."""
from __future__ import annotations

import pytest

from glimr.audit.overlap import AuditSettings, EvalImage, EvalSet, flag_classes, unique_names


def _p(ev, tid, lm, inl, g=0.5, s="ev"):
    return {"eval_set": s, "eval_image": ev, "train_id": tid, "landmark_id": lm, "global_score": g, "inliers": inl}


PAIRS = [
    _p("q1", "a1", "A", 50), _p("q1", "a2", "A", 30), _p("q2", "a1", "A", 25),   # A: 2 eval images
    _p("q3", "b1", "B", 120, g=0.9),                                              # B: 1 eval image, many inliers
    _p("q4", "c1", "C", 19), _p("q5", "c1", "C", 19),                             # C: below 20 everywhere
    _p("q6", "d1", "D", 40, g=0.7), _p("q7", "d2", "D", 40, g=0.6, s="other"),    # D: two eval sets
]


def test_flagging_and_ranking_against_a_direct_count():
    fl = flag_classes(PAIRS, AuditSettings(min_inliers=20))
    # evidence = sum over eval images of their best inlier count: B 120, A 50 + 25 = 75, D 40 + 40 = 80
    assert [(c["landmark_id"], c["evidence"]) for c in fl] == [("B", 120), ("D", 80), ("A", 75)]
    a = fl[2]
    assert (a["eval_images"], a["verified_pairs"], a["max_inliers"], a["rank"]) == (2, 3, 50, 3)
    # best pairs: each eval image's best first (q1's 50, q2's 25), then the rest (q1's 30)
    assert [(p["eval_image"], p["inliers"]) for p in a["best_pairs"]] == [("q1", 50), ("q2", 25), ("q1", 30)]
    assert fl[1]["eval_sets"] == ["ev", "other"]
    assert {c["landmark_id"] for c in flag_classes(PAIRS, AuditSettings(min_inliers=19))} == {"A", "B", "C", "D"}
    assert [c["landmark_id"] for c in flag_classes(PAIRS, AuditSettings(min_inliers=20, min_images=2))] == ["D", "A"]
    assert flag_classes(PAIRS, AuditSettings(min_inliers=20, evidence=1))[2]["best_pairs"] == [PAIRS[0]]
    assert flag_classes(PAIRS, AuditSettings(min_inliers=121)) == []


@pytest.mark.parametrize("kw", [{"top": 0}, {"min_inliers": 3}, {"min_images": 0}, {"chunk": 0}, {"thumb": 10},
                                {"top": 2.5}, {"evidence": True}])
def test_settings_reject_bad_values(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        AuditSettings(**kw)


def test_eval_sets_with_the_same_name_get_suffixes(tmp_path):
    sets = [EvalSet("db", "a/db", [EvalImage("db", "x.jpg", tmp_path / "x.jpg")]),
            EvalSet("db", "b/db", [EvalImage("db", "x.jpg", tmp_path / "y.jpg")])]
    unique_names(sets)
    assert [s.name for s in sets] == ["db", "db_2"] and sets[1].images[0].set == "db_2"
