"""`glimr audit` end to end on a planted overlap (real photos and UKBench objects, real model, FAISS, OpenCV):
every planted class flagged, at most one false class, at the default thresholds; outputs; resume; reuse."""
from __future__ import annotations

import json
import shutil

from glimr.audit.overlap import DEFAULT_MIN_INLIERS, AuditSettings, flag_classes


def _classes(audit_dir):
    return json.loads((audit_dir / "flagged.json").read_text())["classes"]


def test_every_planted_class_is_flagged_and_at_most_one_false_class(planted, planted_audit):
    audit_dir, stdout = planted_audit
    classes = _classes(audit_dir)
    flagged = [c["landmark_id"] for c in classes]
    assert set(planted["planted"]) <= set(flagged), (planted["planted"], flagged)
    false = set(flagged) - set(planted["planted"])
    assert len(false) <= 1, false
    assert not set(planted["decoys"]) & set(flagged)     # look-alike UKBench objects that are not in the eval set
    # ranked by evidence (sum over eval images of their best inlier count), each with its best pairs
    ev = [c["evidence"] for c in classes]
    assert ev == sorted(ev, reverse=True) and [c["rank"] for c in classes] == list(range(1, len(classes) + 1))
    for c in classes:
        assert c["max_inliers"] >= DEFAULT_MIN_INLIERS and c["train_images"] == 2 and c["best_pairs"]
        assert all(p["landmark_id"] == c["landmark_id"] and p["inliers"] >= DEFAULT_MIN_INLIERS
                   for p in c["best_pairs"])
    assert "flagged" in stdout and "review.html" in stdout and "glimr audit apply" in stdout


def test_candidates_hold_every_verified_pair_and_true_pairs_beat_false_ones(planted, planted_audit):
    audit_dir, _ = planted_audit
    cand = json.loads((audit_dir / "candidates.json").read_text())
    n_eval = len(planted["eval_truth"])
    assert len(cand) == n_eval * 10    # every eval image x its top 10 (no unreadable image here)
    assert set(cand[0]) == {"eval_set", "eval_image", "train_id", "landmark_id", "global_score", "inliers", "score"}
    truth = planted["eval_truth"]
    true = [r["inliers"] for r in cand if truth[r["eval_image"]] == r["landmark_id"]]
    false = [r["inliers"] for r in cand if truth[r["eval_image"]] != r["landmark_id"]]
    assert true and max(false) < DEFAULT_MIN_INLIERS <= max(true), (sorted(true), max(false))
    # the score is sv's: global + weight * clip((inliers - 8) / (20 - 8), 0, 1); exact to the 6 decimals stored
    for r in cand[:50]:
        f = min(max(r["inliers"] - 8, 0), 12) / 12
        assert abs(r["score"] - (r["global_score"] + f)) <= 1e-6 + 1e-9
    # flag_classes at a stricter threshold is a subset, ranked the same way
    strict = flag_classes(cand, AuditSettings(min_inliers=200))
    assert {c["landmark_id"] for c in strict} <= {c["landmark_id"] for c in _classes(audit_dir)}


def test_a_rerun_resumes_from_the_committed_chunks(planted, planted_audit, audit_fn, tmp_path):
    """A copy of the audit whose last verification chunk was never committed (as if killed): the rerun embeds
    nothing, retrieves nothing, verifies only that chunk, and gives the same result."""
    audit_dir, _ = planted_audit
    copy = tmp_path / "audit"
    shutil.copytree(audit_dir, copy)
    ver = sorted(copy.glob("work/*/verify-*/*.json"))
    ret = sorted(copy.glob("work/*/retrieval/*.json"))
    assert len(ver) == len(ret) == 3          # 34 eval images in chunks of 16
    ver[-1].unlink()
    before = {p: p.stat().st_mtime_ns for p in ver[:-1] + ret}
    _, out = audit_fn(planted["train_csv"], planted["images"], [planted["eval"]], copy)
    assert "0 added, 42 unchanged" in out
    assert {p: p.stat().st_mtime_ns for p in before} == before and ver[-1].is_file()
    assert json.loads((copy / "candidates.json").read_text()) == \
        json.loads((audit_dir / "candidates.json").read_text())
    assert _classes(copy) == _classes(audit_dir)


def test_a_second_audit_reuses_the_training_index_and_skips_a_bad_eval_image(planted, planted_audit, audit_fn,
                                                                              tmp_path, capsys):
    audit_dir, _ = planted_audit
    index = tmp_path / "shared-index"
    shutil.copytree(audit_dir / "train-index", index)
    folder = tmp_path / "more-eval"
    folder.mkdir()
    for name in ("q0003.jpg", "q0008.jpg"):   # a planted object's clean view, another object's
        shutil.copy(f"{planted['eval']}/query/{name}", folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _, out = audit_fn(planted["train_csv"], planted["images"], [str(folder)], tmp_path / "audit2", index_dir=index)
    assert "0 added, 42 unchanged" in out           # embedded once, reused
    assert "broken.jpg" in capsys.readouterr().err  # reported, and the audit went on
    assert [c["landmark_id"] for c in _classes(tmp_path / "audit2")] == ["900003"]
    a = json.loads((tmp_path / "audit2" / "audit.json").read_text())
    assert a["eval_sets"][0]["unreadable"] == 1 and a["eval_sets"][0]["eval_images"] == 3
