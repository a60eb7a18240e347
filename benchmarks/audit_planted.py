"""Planted-overlap benchmark of `glimr audit`: inlier counts of true and false pairs, flagged classes over a grid
of thresholds, and the time per eval image for retrieval and for the verification of its top-100 candidates.

    PYTHONPATH=. python benchmarks/audit_planted.py --work bench-data/audit-planted

The data (glimr.audit.planted, deterministic): a GLDv2-format training set of TRAIN_PHOTOS real photos, each its
own class with VIEWS augmented views, plus 10 planted UKBench objects and 10 decoy UKBench objects (2 augmented
views each); an eval set built as Clutter-UKB is (clean query view + the other 3 views pasted small into real
photos, plus NEGATIVES), of the 10 planted objects and OTHERS others, with backgrounds from the other half of the
photos. The audit runs with the default settings (model, top 100, min_inliers) through glimr.audit.pipeline,
twice: cold (every feature extracted) and warm (verification again with the local features cached on disk).

Writes benchmarks/results/audit_inliers.png (the two inlier distributions), .json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()


def main(argv=None) -> int:
    from glimr.audit.overlap import AuditSettings

    d = AuditSettings()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench-data/audit-planted")
    ap.add_argument("--train-photos", type=int, default=100)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--negatives", type=int, default=40)
    ap.add_argument("--others", type=int, default=10, help="eval objects besides the 10 planted ones")
    ap.add_argument("--model", default=None, help="default: glimr's default model")
    ap.add_argument("--top", type=int, default=d.top)
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--timing", type=int, default=0, metavar="N",
                    help="after a full run: time N eval images (evenly taken) against the same training index, cold "
                         "(no local feature cached) then warm; updates the JSON's and markdown's timings")
    ap.add_argument("--reuse", action="store_true",
                    help="analyse the existing WORK/audit again (new thresholds); timings from the previous JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "audit_inliers"))
    args = ap.parse_args(argv)

    from glimr.audit.pipeline import run_audit
    from glimr.audit.planted import build_planted
    from glimr.extract.multiscale import ExtractSettings
    from glimr.models.registry import DEFAULT_MODEL, build_model

    work = Path(args.work)
    data = work / "data"
    planted = (3, 11, 17, 24, 31, 42, 50, 57, 63, 71)
    decoys = (5, 14, 22, 29, 36, 45, 54, 60, 66, 73)
    others = tuple(o for o in range(75) if o not in planted + decoys)[:args.others]
    if not (data / "truth.json").is_file():
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.perf_counter()
        build_planted(data, DATA / "photos", DATA / "ukbench", train_photos=args.train_photos, views=args.views,
                      planted=planted, decoys=decoys, others=others, negatives=args.negatives, size=512,
                      bg_size=800, scale=(0.28, 0.65), seed=0)
        print(f"data built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    truth = json.loads((data / "truth.json").read_text())
    model_name = args.model or DEFAULT_MODEL
    model = build_model(model_name)
    ext = ExtractSettings(model=model_name, max_size=args.max_size, workers=0)
    settings = AuditSettings(top=args.top)
    audit = work / "audit"
    out = Path(args.out)
    if args.timing:
        return _timing(args, truth, audit, settings, model, model_name, ext, out)
    if args.reuse:
        prev = json.loads(out.with_suffix(".json").read_text())
        summary = run_audit(truth["train_csv"], truth["images"], [truth["eval"]], audit, model, ext, settings,
                            progress=False, log=lambda m: print(m, file=sys.stderr))
        return _analyse(args, truth, audit, settings, model_name, summary, summary, prev["time"], out)
    shutil.rmtree(audit, ignore_errors=True)
    t0 = time.perf_counter()
    cold = run_audit(truth["train_csv"], truth["images"], [truth["eval"]], audit, model, ext, settings,
                     progress=False, log=lambda m: print(m, file=sys.stderr))
    wall_cold = time.perf_counter() - t0
    # warm: the same verification with every local feature on disk (the retrieval chunks are reused too)
    for v in (audit / "work").glob("*/verify-*"):
        shutil.rmtree(v)
    t0 = time.perf_counter()
    warm = run_audit(truth["train_csv"], truth["images"], [truth["eval"]], audit, model, ext, settings,
                     progress=False, log=lambda m: print(m, file=sys.stderr))
    wall_warm = time.perf_counter() - t0
    times = {"retrieval_s_per_eval_image": cold["eval_sets"][0]["retrieval_s_per_image"],
             "verification_s_per_eval_image_cold": cold["eval_sets"][0]["verification_s_per_image"],
             "verification_s_per_eval_image_warm": warm["eval_sets"][0]["verification_s_per_image"],
             "index_build_s": cold["index_seconds"], "audit_wall_s_cold": wall_cold, "audit_wall_s_warm": wall_warm}
    return _analyse(args, truth, audit, settings, model_name, cold, warm, times, out)


def _analyse(args, truth, audit, settings, model_name, cold, warm, times, out) -> int:
    from glimr.audit.overlap import AuditSettings

    cand = json.loads((audit / "candidates.json").read_text())
    et = truth["eval_truth"]
    true_inl = [r["inliers"] for r in cand if et.get(r["eval_image"]) == r["landmark_id"]]
    false_inl = [r["inliers"] for r in cand if et.get(r["eval_image"]) != r["landmark_id"]]
    planted_ids = set(truth["planted"])
    # eval images that show a planted object, and whether one of its class's training images was retrieved
    shows = [n for n, lm in et.items() if lm is not None]
    retrieved = {(r["eval_image"]) for r in cand if et.get(r["eval_image"]) == r["landmark_id"]}
    grid = []
    from glimr.audit.overlap import flag_classes

    for mi in (6, 8, 10, 12, 15, 20, 25, 30, 40, 50):
        for mimg in (1, 2):
            s = AuditSettings(top=args.top, min_inliers=mi, min_images=mimg)
            fl = {c["landmark_id"] for c in flag_classes(cand, s)}
            grid.append({"min_inliers": mi, "min_images": mimg, "planted_flagged": len(fl & planted_ids),
                         "planted": len(planted_ids), "false_classes": len(fl - planted_ids),
                         "false_ids": sorted(fl - planted_ids),
                         "decoys_flagged": len(fl & set(truth["decoys"]))})
    flagged = json.loads((audit / "flagged.json").read_text())["classes"]
    fl_default = {c["landmark_id"] for c in flagged}
    e_cold = cold["eval_sets"][0]
    command = "PYTHONPATH=. python benchmarks/audit_planted.py " + " ".join(sys.argv[1:])
    if args.reuse:   # the run that measured keeps its name
        command = json.loads(out.with_suffix(".json").read_text())["command"]
    res = {
        "command": command,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "model": model_name, "max_size": args.max_size, "settings": settings.to_json(),
        "train_images": cold["train_images"], "train_classes": cold["train_classes"],
        "eval_images": e_cold["eval_images"], "pairs": len(cand),
        "true_pairs": len(true_inl), "false_pairs": len(false_inl),
        "eval_images_showing_planted": len(shows), "of_which_class_retrieved_in_top": len(retrieved),
        "true_inliers": _stats(true_inl), "false_inliers": _stats(false_inl),
        "false_inliers_max": int(max(false_inl)) if false_inl else None,
        "true_pairs_at_or_above_default": int(sum(x >= settings.min_inliers for x in true_inl)),
        "false_pairs_at_or_above_default": int(sum(x >= settings.min_inliers for x in false_inl)),
        "default_flagged": sorted(fl_default), "default_planted_flagged": len(fl_default & planted_ids),
        "default_false_classes": sorted(fl_default - planted_ids),
        "grid": grid,
        "time": times,
        "inliers_true": sorted(true_inl), "inliers_false_hist": np.bincount(false_inl).tolist(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    _plot(true_inl, false_inl, settings.min_inliers, out.with_suffix(".png"), res)
    out.with_suffix(".md").write_text(_markdown(res))
    print(_markdown(res))
    return 0


def _timing(args, truth, audit, settings, model, model_name, ext, out) -> int:
    """Time per eval image on N eval images against the full run's training index: retrieval (descriptor +
    FAISS), verification of the top-k cold (every local feature extracted: the eval image's and each training
    candidate's) and warm (features from the disk cache); wall and CPU seconds (all threads)."""
    from glimr.audit.pipeline import run_audit

    t = Path(args.work) / "timing"
    shutil.rmtree(t, ignore_errors=True)
    names = sorted(truth["eval_truth"])
    pick = [names[int(i)] for i in np.linspace(0, len(names) - 1, args.timing).round()]
    (t / "eval").mkdir(parents=True)
    for n in pick:
        shutil.copy(Path(truth["eval"]) / n, t / "eval" / n.replace("/", "_"))
    shutil.copytree(audit / "train-index", t / "index", ignore=shutil.ignore_patterns("sv"))
    runs = {}
    for mode in ("cold", "warm"):
        if mode == "warm":
            for v in (t / "audit" / "work").glob("*/verify-*"):
                shutil.rmtree(v)
        s = run_audit(truth["train_csv"], truth["images"], [str(t / "eval")], t / "audit", model, ext, settings,
                      index_dir=t / "index", progress=False, log=lambda m: print(m, file=sys.stderr))
        runs[mode] = s["eval_sets"][0]
    c, w = runs["cold"], runs["warm"]
    res = json.loads(out.with_suffix(".json").read_text())
    res["time"] = {"eval_images_timed": args.timing, "top": settings.top,
                   "retrieval_s_per_eval_image": c["retrieval_s_per_image"],
                   "retrieval_cpu_s_per_eval_image": c["retrieval_cpu_s_per_image"],
                   "verification_s_per_eval_image_cold": c["verification_s_per_image"],
                   "verification_cpu_s_per_eval_image_cold": c["verification_cpu_s_per_image"],
                   "verification_s_per_eval_image_warm": w["verification_s_per_image"],
                   "verification_cpu_s_per_eval_image_warm": w["verification_cpu_s_per_image"],
                   "load_average_1min_after": os.getloadavg()[0],
                   "command": "PYTHONPATH=. python benchmarks/audit_planted.py " + " ".join(sys.argv[1:]),
                   "full_run": res["time"] if "eval_images_timed" not in res["time"] else res["time"]["full_run"]}
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(res))
    print(_markdown(res))
    return 0


def _stats(x) -> dict:
    if not x:
        return {}
    a = np.asarray(x)
    return {"n": int(a.size), "min": int(a.min()), "p50": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": int(a.max())}


def _plot(true_inl, false_inl, thr, path: Path, res) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    top = max(max(true_inl, default=1), max(false_inl, default=1))
    bins = np.unique(np.concatenate([np.arange(0, 31), np.geomspace(31, top + 2, 25).astype(int)]))
    ax.hist(false_inl, bins=bins, color="tab:gray", alpha=0.8, label=f"false pairs (n={len(false_inl)})")
    ax.hist(true_inl, bins=bins, color="tab:red", alpha=0.7, label=f"true pairs (n={len(true_inl)})")
    ax.axvline(thr, color="k", ls="--", lw=1, label=f"default min_inliers = {thr}")
    ax.set_xscale("symlog", linthresh=30, linscale=1.5)
    ax.set_xlim(0, bins[-1])
    ax.set_xticks([0, 5, 10, 20, 30, 100, 300] + ([1000] if top > 1000 else []))
    ax.set_xticklabels([str(v) for v in ax.get_xticks().astype(int)])
    ax.set_yscale("log")
    ax.set_xlabel("RANSAC inliers (SIFT + homography, glimr.rerank.sv)")
    ax.set_ylabel("pairs")
    ax.set_title(f"glimr audit, planted overlap: {res['train_images']} training images, {res['eval_images']} eval "
                 f"images, top {res['settings']['top']}", fontsize=10)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _markdown(r) -> str:
    t = r["time"]
    lines = [
        "# glimr audit: planted-overlap benchmark", "",
        (f"`{r['command']}` on {r['machine']}; model {r['model']} (max side {r['max_size']}), "
        f"top {r['settings']['top']}, default min_inliers {r['settings']['min_inliers']}, "
        f"min_images {r['settings']['min_images']}."), "",
        (f"Training set: {r['train_images']} images in {r['train_classes']} classes (photo classes, 10 planted and "
        f"10 decoy UKBench objects); eval: {r['eval_images']} images (Clutter-UKB recipe, 10 planted + other "
        f"objects, negatives); {r['pairs']} pairs verified: {r['true_pairs']} true (eval image shows the planted "
        f"class), {r['false_pairs']} false."), "",
        (f"Eval images showing a planted object: {r['eval_images_showing_planted']}; the planted class was in the "
        f"global top {r['settings']['top']} for {r['of_which_class_retrieved_in_top']} of them."), "",
        "| pairs | n | min | median | p90 | p99 | max | >= default |", "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, key in (("true", "true_inliers"), ("false", "false_inliers")):
        s = r[key]
        n_at = r[f"{k}_pairs_at_or_above_default"]
        lines.append(f"| {k} | {s.get('n', 0)} | {s.get('min')} | {s.get('p50')} | {s.get('p90')} | {s.get('p99')} | "
                     f"{s.get('max')} | {n_at} |")
    lines += ["", (f"At the defaults: {r['default_planted_flagged']} of 10 planted classes flagged, false classes: "
              f"{r['default_false_classes'] or 'none'}."), "",
              "Flagged classes over thresholds (planted flagged / false classes):", "",
              "| min_inliers | min_images=1 | min_images=2 |", "|---:|---|---|"]
    by = {}
    for g in r["grid"]:
        by.setdefault(g["min_inliers"], {})[g["min_images"]] = f"{g['planted_flagged']}/{g['planted']} planted, " \
                                                                f"{g['false_classes']} false"
    for mi, v in by.items():
        lines.append(f"| {mi} | {v.get(1)} | {v.get(2)} |")
    if "eval_images_timed" in t:
        lines += ["", (f"Time per eval image on this CPU ({r['machine']}; 1-min load average "
                      f"{t['load_average_1min_after']:.1f} at the end: the machine was shared, so wall times are "
                      f"inflated; CPU = all threads of the process), {t['eval_images_timed']} eval images against "
                      f"the {r['train_images']}-image training index (`{t['command']}`):"), "",
                  "| stage | wall s / eval image | CPU s / eval image |", "|---|---:|---:|",
                  (f"| retrieval (global descriptor + FAISS top {t['top']}) | {t['retrieval_s_per_eval_image']:.3f} | "
                  f"{t['retrieval_cpu_s_per_eval_image']:.3f} |"),
                  (f"| verification of {t['top']} candidates, cold (local features of the eval image and of each "
                  f"training candidate extracted) | {t['verification_s_per_eval_image_cold']:.3f} | "
                  f"{t['verification_cpu_s_per_eval_image_cold']:.3f} |"),
                  (f"| verification of {t['top']} candidates, warm (features from the disk cache: matching + RANSAC) "
                  f"| {t['verification_s_per_eval_image_warm']:.3f} | {t['verification_cpu_s_per_eval_image_warm']:.3f} |"),
                  ""]
        t = t["full_run"]
    lines += ["", "Full run, wall time per eval image (shared machine):", "",
              (f"- retrieval (global descriptor + FAISS top {r['settings']['top']}): "
              f"{t['retrieval_s_per_eval_image']:.3f} s"),
              (f"- verification of its {r['settings']['top']} candidates, cold: "
              f"{t['verification_s_per_eval_image_cold']:.3f} s; warm: {t['verification_s_per_eval_image_warm']:.3f} s"),
              f"- training index build: {t['index_build_s']:.0f} s for {r['train_images']} images", ""]
    lines += [
              "Plot: audit_inliers.png (log counts; x linear to 30 inliers, logarithmic above).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
