"""The evaluation protocols on the real ground-truth files (../shared/data/revisited/*.pkl).

Reference values are worked out by hand or by ``reference_ap_pk`` below: an independent, deliberately
plain implementation (walk the ranked list, skip ignored images, integrate the precision-recall curve
with the trapezoidal rule) that shares no code with glimr.eval.metrics.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from glimr.data.revisited import load_gnd
from glimr.eval import metrics as M


@pytest.fixture(scope="module")
def gnds(shared_data):
    return {n: load_gnd(shared_data / "revisited" / f"gnd_{n}.pkl")
            for n in ("roxford5k", "rparis6k", "oxford5k", "paris6k")}


def reference_ap_pk(ranking, positives, ignored, kappas=(1, 5, 10)):
    """AP (fraction) and P@k for one query, computed from scratch with plain Python.

    The precision-recall curve starts at (recall 0, precision 1). Each positive raises recall by
    1/n_pos; the area of that strip is its width times the mean of the precision just before the
    positive was retrieved and the precision just after. P@k counts positives among the first k
    non-ignored images, the cutoff lowered to the position of the last retrieved positive.
    """
    positives, ignored = set(int(x) for x in positives), set(int(x) for x in ignored)
    if not positives:
        return None
    recall, area = 0.0, 0.0
    retrieved = hits = 0
    hit_at = []
    for idx in ranking:
        idx = int(idx)
        if idx in ignored:
            continue
        precision_before = 1.0 if retrieved == 0 else hits / retrieved
        retrieved += 1
        if idx in positives:
            hits += 1
            hit_at.append(retrieved)
            new_recall = hits / len(positives)
            area += (new_recall - recall) * (precision_before + hits / retrieved) / 2
            recall = new_recall
    pk = {}
    for k in kappas:
        if not hit_at:
            pk[k] = 0.0
            continue
        cutoff = min(k, hit_at[-1])
        pk[k] = sum(1 for h in hit_at if h <= cutoff) / cutoff
    return area, pk


def reference_means(ranks, truth, kappas=(1, 5, 10)):
    """``truth``: list of (positives, ignored) per query. Means in percent over queries with positives."""
    aps, pks = [], {k: [] for k in kappas}
    for j, (pos, ign) in enumerate(truth):
        r = reference_ap_pk(ranks[:, j], pos, ign, kappas)
        if r is None:
            continue
        aps.append(r[0])
        for k in kappas:
            pks[k].append(r[1][k])
    out = {"mAP": 100 * sum(aps) / len(aps)}
    out.update({f"mP@{k}": 100 * sum(v) / len(v) for k, v in pks.items()})
    return out


def revisited_truth(gnd, protocol):
    sets = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
            "hard": (("hard",), ("junk", "easy"))}[protocol]
    return [([i for k in sets[0] for i in g[k]], [i for k in sets[1] for i in g[k]]) for g in gnd]


def ranking_with_first(first, n_db):
    """A ranking (1-D) listing ``first`` in that order, then every other database index ascending."""
    first = [int(i) for i in first]
    rest = np.setdiff1d(np.arange(n_db), first)
    return np.concatenate([np.array(first, dtype=np.int64), rest])


def assert_metrics_close(a, b, tol=1e-9):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=tol), k


# ------------------------------------------------------------------------------------------ perfect
@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_perfect_rankings_give_100(gnds, name):
    d = gnds[name]
    n_db = len(d["imlist"])
    # easy first, then hard, then junk, then the rest: perfect under all three protocols, because
    # Hard ignores the easy images and Easy ignores the hard ones
    cols = [ranking_with_first(list(g["easy"]) + list(g["hard"]) + list(g["junk"]), n_db) for g in d["gnd"]]
    ranks = np.stack(cols, axis=1)
    assert ranks.shape == (n_db, 70)
    res = M.revisited_map(ranks, d["gnd"])
    assert set(res) == {"easy", "medium", "hard"}
    for proto in res.values():
        assert set(proto) == {"mAP", "mP@1", "mP@5", "mP@10"}
        for v in proto.values():
            assert v == pytest.approx(100.0)
    # junk interleaved between the positives changes nothing
    cols = []
    for g in d["gnd"]:
        pos, junk = list(g["easy"]) + list(g["hard"]), list(g["junk"])
        first = [x for i, p in enumerate(pos) for x in ([junk[i]] if i < len(junk) else []) + [p]]
        cols.append(ranking_with_first(first + junk[len(pos):], n_db))
    for v in M.revisited_map(np.stack(cols, axis=1), d["gnd"])["medium"].values():
        assert v == pytest.approx(100.0)


def test_easy_excludes_queries_without_easy_positives(gnds):
    d = gnds["roxford5k"]
    ranks = np.tile(np.arange(len(d["imlist"]))[:, None], (1, 70))
    res = M.revisited_eval(ranks, d["gnd"])
    assert res["easy"].excluded == [11, 66]  # balliol_000187 and hertford_000082 have no easy image
    assert math.isnan(res["easy"].aps[11]) and "2 of 70 queries" in res["easy"].note()
    assert res["medium"].excluded == [] and res["hard"].excluded == []


@pytest.mark.parametrize("name", ["oxford5k", "paris6k"])
def test_original_protocol_perfect_and_positives_are_ok(gnds, name):
    d = gnds[name]
    n_db = len(d["imlist"])
    assert len(d["qimlist"]) == 55
    cols = [ranking_with_first(list(g["ok"]) + list(g["junk"]), n_db) for g in d["gnd"]]
    res = M.oxford_map(np.stack(cols, axis=1), d["gnd"])
    assert res == {"mAP": pytest.approx(100.0), "mP@1": pytest.approx(100.0),
                   "mP@5": pytest.approx(100.0), "mP@10": pytest.approx(100.0)}
    # the Revisited entry point refuses the old files rather than silently evaluating them
    with pytest.raises(ValueError, match="original-protocol"):
        M.revisited_map(np.stack(cols, axis=1), d["gnd"])
    with pytest.raises(ValueError, match="Revisited"):
        M.oxford_map(np.zeros((10, 70), dtype=np.int64), gnds["roxford5k"]["gnd"])


def test_original_protocol_counts_good_and_ok():
    gnd = [{"good": [3], "ok": [5], "junk": [0]}]
    ranks = np.array([0, 3, 1, 5, 2, 4])[:, None]  # after junk: 3 (r0), 1, 5 (r2)
    ap = (1 + 1) / 2 + (1 / 2 + 2 / 3) / 2
    assert M.oxford_map(ranks, gnd)["mAP"] == pytest.approx(100 * ap / 2)


# ------------------------------------------------------------------------------------- by hand
def test_one_positive_at_known_places_hand_ap(gnds):
    """pitt_rivers_000033 (ROxford query 45): easy = [3723], hard = [2505], junk = [3362]."""
    d = gnds["roxford5k"]
    q = d["qimlist"].index("pitt_rivers_000033")
    g = d["gnd"][q]
    assert (list(g["easy"]), list(g["hard"]), list(g["junk"])) == ([3723], [2505], [3362])
    ranking = ranking_with_first([3362, 2505, 0, 1, 3723], len(d["imlist"]))
    res = M.revisited_map(ranking[:, None], [g])
    # Easy: 3362 and 2505 ignored -> 0, 1, 3723: the only positive at rank 2 (0-based).
    #   AP = (0/2 + 1/3) / 2 = 1/6; P@1 = 0; P@5 and P@10: cutoff lowered to position 3 -> 1/3
    assert res["easy"]["mAP"] == pytest.approx(100 / 6)
    assert res["easy"]["mP@1"] == pytest.approx(0.0)
    assert res["easy"]["mP@5"] == pytest.approx(100 / 3)
    assert res["easy"]["mP@10"] == pytest.approx(100 / 3)
    # Medium: 3362 ignored -> 2505 (rank 0), 0, 1, 3723 (rank 3); two positives
    #   AP = [(1 + 1)/2 + (1/3 + 2/4)/2] / 2 = 17/24; P@1 = 1; P@5 = P@10 = 2/4 (cutoff = position 4)
    assert res["medium"]["mAP"] == pytest.approx(100 * 17 / 24)
    assert res["medium"]["mP@1"] == pytest.approx(100.0)
    assert res["medium"]["mP@5"] == pytest.approx(50.0)
    # Hard: 3362 and 3723 ignored -> 2505 first: AP = 1
    assert res["hard"] == {k: pytest.approx(100.0) for k in ("mAP", "mP@1", "mP@5", "mP@10")}


def test_many_positives_one_moved_down_hand_ap(gnds):
    """all_souls_000013 (query 0), Medium: 103 positives; 102 of them first, the last at rank 200."""
    d = gnds["roxford5k"]
    g = d["gnd"][0]
    pos = list(g["easy"]) + list(g["hard"])
    assert len(pos) == 103
    negatives = [i for i in range(len(d["imlist"])) if i not in set(pos) | set(g["junk"])]
    # junk at the very top must not matter; the last positive after 98 negatives -> rank 102 + 98 = 200
    first = list(g["junk"]) + pos[:102] + negatives[:98] + [pos[102]]
    res = M.revisited_map(ranking_with_first(first, len(d["imlist"]))[:, None], [g])
    ap = (102 + (102 / 200 + 103 / 201) / 2) / 103
    assert res["medium"]["mAP"] == pytest.approx(100 * ap)
    assert res["medium"]["mP@10"] == pytest.approx(100.0)


def test_compute_ap_formula():
    # positives at ranks 0, 2, 5 of 4: 0 + (1/2 + 2/3)/2 + (2/5 + 3/6)/2 + 1, over 4
    expected = (1 + (1 / 2 + 2 / 3) / 2 + (2 / 5 + 3 / 6) / 2) / 4
    assert M.compute_ap([0, 2, 5], 4) == pytest.approx(expected)
    assert M.compute_ap([], 3) == 0.0


# ------------------------------------------------------------------------------ random vs reference
@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_random_rankings_match_independent_implementation(gnds, name):
    d = gnds[name]
    rng = np.random.default_rng(0 if name == "roxford5k" else 1)
    n_db = len(d["imlist"])
    ranks = np.stack([rng.permutation(n_db) for _ in range(70)], axis=1)
    # make it less trivial than pure chance: pull some positives up in a few columns
    for j in range(0, 70, 3):
        g = d["gnd"][j]
        pos = np.concatenate([g["easy"], g["hard"]])
        top = rng.permutation(pos)[: max(1, len(pos) // 2)]
        col = [int(i) for i in ranks[:, j] if i not in set(top.tolist())]
        for t in top:
            col.insert(int(rng.integers(0, 30)), int(t))
        ranks[:, j] = col
    res = M.revisited_map(ranks, d["gnd"])
    for proto in ("easy", "medium", "hard"):
        assert_metrics_close(res[proto], reference_means(ranks, revisited_truth(d["gnd"], proto)))


@pytest.mark.parametrize("name", ["oxford5k", "paris6k"])
def test_random_rankings_original_protocol_match_reference(gnds, name):
    d = gnds[name]
    rng = np.random.default_rng(2)
    n_db = len(d["imlist"])
    ranks = np.stack([rng.permutation(n_db) for _ in range(55)], axis=1)
    truth = [(list(g["ok"]), list(g["junk"])) for g in d["gnd"]]
    assert_metrics_close(M.oxford_map(ranks, d["gnd"]), reference_means(ranks, truth))


# ------------------------------------------------------------------------------------------- junk
@pytest.mark.parametrize("protocol", ["easy", "medium", "hard"])
def test_junk_never_counts_for_or_against(gnds, protocol):
    d = gnds["roxford5k"]
    rng = np.random.default_rng(3)
    n_db = len(d["imlist"])
    truth = revisited_truth(d["gnd"], protocol)
    base = np.stack([rng.permutation(n_db) for _ in range(70)], axis=1)
    moved_top, moved_random = base.copy(), base.copy()
    for j, (_, ign) in enumerate(truth):
        ign = set(ign)
        kept = [int(i) for i in base[:, j] if i not in ign]
        junk = [int(i) for i in base[:, j] if i in ign]
        moved_top[:, j] = junk + kept  # every ignored image ranked first
        col = list(kept)
        for i in junk:  # ignored images scattered anywhere
            col.insert(int(rng.integers(0, len(col) + 1)), i)
        moved_random[:, j] = col
    r0 = M.revisited_map(base, d["gnd"])[protocol]
    assert_metrics_close(r0, M.revisited_map(moved_top, d["gnd"])[protocol])
    assert_metrics_close(r0, M.revisited_map(moved_random, d["gnd"])[protocol])
    # and dropping them from the list altogether (one query: columns must have equal length)
    j = 0
    kept = np.array([i for i in base[:, j] if i not in set(truth[j][1])])
    one = M.revisited_map(kept[:, None], [d["gnd"][j]])[protocol]
    ref = M.revisited_map(base[:, j:j + 1], [d["gnd"][j]])[protocol]
    assert_metrics_close(one, ref)


# ------------------------------------------------------------------------------------- accidents
def test_ranks_are_validated(gnds):
    d = gnds["roxford5k"]
    n_db = len(d["imlist"])
    ranks = np.tile(np.arange(n_db)[:, None], (1, 70))
    with pytest.raises(ValueError, match="transposed"):
        M.revisited_map(ranks.T, d["gnd"])
    with pytest.raises(ValueError, match="integer"):
        M.revisited_map(ranks.astype(np.float32), d["gnd"])
    dup = ranks.copy()
    dup[1, 5] = dup[0, 5]
    with pytest.raises(ValueError, match="more than once"):
        M.revisited_map(dup, d["gnd"])


def test_truncated_rankings_count_missing_positives_as_not_retrieved():
    gnd = [{"ok": [7, 8, 9], "junk": []}]
    ranks = np.array([7, 1, 2])[:, None]  # only the top 3 listed; 8 and 9 never retrieved
    assert M.compute_map(ranks, gnd).map == pytest.approx(100 / 3)
    none = np.array([1, 2, 3])[:, None]
    r = M.compute_map(none, gnd)
    assert r.map == 0.0 and r.mp[1] == 0.0


# ----------------------------------------------------------------------------------- UKBench, json
def test_ukbench_ns():
    n = 12  # 3 objects
    perfect = np.stack([np.r_[[4 * (j // 4) + i for i in range(4)],
                              [x for x in range(n) if x // 4 != j // 4]] for j in range(n)], axis=1)
    assert M.ukbench_ns(perfect) == pytest.approx(4.0)
    # query 0: itself, one other view, then two wrong images -> 2; the others perfect
    bad = perfect.copy()
    bad[:, 0] = [0, 1, 4, 8, 2, 3, 5, 6, 7, 9, 10, 11]
    score, per_query = M.ukbench_ns(bad, per_query=True)
    assert per_query[0] == 2 and score == pytest.approx((2 + 4 * 11) / 12)


def test_gnd_json_map_matches_reference():
    rng = np.random.default_rng(4)
    n_db, nq = 60, 7
    positives = [sorted(rng.choice(n_db, 3, replace=False).tolist()) for _ in range(nq)]
    ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
    res = M.gnd_json_map(ranks, positives)
    assert set(res) == {"mAP", "mP@1", "mP@3"}
    assert_metrics_close(res, reference_means(ranks, [(p, []) for p in positives], kappas=(1, 3)))
