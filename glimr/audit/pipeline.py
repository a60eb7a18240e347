"""`glimr audit` end to end (:func:`run_audit`) and `glimr audit apply` (:func:`apply_decisions`).

AUDIT_DIR after an audit::

    audit.json           what was audited and how (training CSV, image folder, index, eval sets, settings, the
                         audit id that review.html and decisions.json carry), timings
    candidates.json      one row per verified pair: eval_set, eval_image, train_id, landmark_id, global_score,
                         inliers, score (sv's global + weight * f(inliers))
    flagged.json         the flagged landmark ids, ranked by evidence, each with its best pairs
    review.html          the page for human review (glimr.audit.review)
    summary.txt          the printed summary
    missing_train_images.txt   (when some) every image the CSV lists that is not under --images
    train-index/         the training set's glimr index (unless --index puts it elsewhere, to share it)
    features/            eval images' local features;  work/  the resumable per-chunk results

After `glimr audit apply`: the cleaned CSV (``--out``), and AUDIT_DIR/report.md + report.json: the removed
classes and images per eval set, in the form of the paper's Table 2 (and Table 3 for the training set).
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from glimr.audit.overlap import (
    AuditSettings,
    EvalSet,
    build_train_index,
    flag_classes,
    load_eval_set,
    retrieve,
    train_lookup,
    unique_names,
    work_key,
)
from glimr.io.atomic import atomic_write_bytes

__all__ = ["apply_decisions", "run_audit"]

AUDIT_VERSION = 1


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _file_id(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def run_audit(train_csv, images, against: list[str], out, model, extract_settings, settings: AuditSettings, *,
              root=None, index_dir=None, progress: bool = True, log=print) -> dict:
    """Audit the GLDv2-format training set (``train_csv`` + ``images``) against the eval sets ``against``
    (see glimr.audit.overlap.load_eval_set) into ``out``; ``model``: the built model that ``extract_settings``
    (glimr.extract.multiscale.ExtractSettings) describes. Returns the summary dict (also in audit.json)."""
    from glimr.audit.review import render_review
    from glimr.audit.verify import verify_retrieved
    from glimr.data.gldv2 import load_gldv2
    from glimr.index.store import IndexStore, db_path

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out '{out}' is a file: give a folder for the audit")
    old = _read_audit(out) if (out / "audit.json").is_file() else None
    audit_id = old["audit_id"] if old else uuid.uuid4().hex[:12]
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr)

    train = load_gldv2(train_csv, images, progress=progress, warn=warn)
    sets: list[EvalSet] = [load_eval_set(s, root) for s in against]   # every input checked before any write
    out.mkdir(parents=True, exist_ok=True)
    miss_file = out / "missing_train_images.txt"
    if train.missing:
        atomic_write_bytes(miss_file, "".join(f"{i},{lm},line {ln}\n" for i, lm, ln in train.missing).encode())
    elif miss_file.exists():
        miss_file.unlink()
    unique_names(sets)
    for s in sets:
        for n in s.notes:
            warn(n)
    index_dir = Path(index_dir) if index_dir is not None else out / "train-index"
    t0 = time.perf_counter()
    rep = build_train_index(train, index_dir, model, extract_settings, progress=progress)
    t_index = time.perf_counter() - t0
    log(f"training index {index_dir}: {rep}")
    lookup = train_lookup(train)
    csv_id = _file_id(Path(train_csv))
    cfg = settings.sv_config()
    candidates: list[dict] = []
    per_set = []
    with IndexStore.open(index_dir, quiet=True) as store:
        hashes = {}
        rows_by_path = store.rows()
        for i, p in enumerate(train.paths):
            r = rows_by_path.get(db_path(p.relative_to(train.root).as_posix()))
            if r is not None and r.hash:
                hashes[i] = r.hash
        for s in sets:
            listing = [[e.name, str(e.path), e.box] for e in s.images]
            ex = store.config.extract
            kr = work_key("retrieval", [ex.model, ex.checkpoint_sha256, list(ex.scales), ex.max_size], store.n_vectors,
                          store.stats()["images"], listing, settings.top, settings.chunk)
            kv = work_key("verify", asdict(cfg), csv_id, settings.chunk)
            wdir = out / "work" / f"{s.name}-{kr}"
            rows = retrieve(s, store, model, wdir / "retrieval", settings, progress=progress,
                            workers=extract_settings.workers)
            pairs = verify_retrieved(s.name, rows, store, train, lookup, wdir / f"verify-{kv}", out / "features",
                                     settings, progress=progress)
            candidates.extend(pairs)
            t_ret, c_ret = _seconds((wdir / "retrieval").glob("*.json"))
            t_ver, c_ver = _seconds((wdir / f"verify-{kv}").glob("*.json"))
            n = len(s.images)
            errors = sum(1 for r in rows if r["error"])
            verified_imgs = {p["eval_image"] for p in pairs if p["inliers"] >= settings.min_inliers}
            per_set.append({"name": s.name, "spec": s.spec, "eval_images": n, "unreadable": errors,
                            "pairs_verified": len(pairs), "eval_images_with_verified_pair": len(verified_imgs),
                            "retrieval_s_per_image": t_ret / max(n, 1), "verification_s_per_image": t_ver / max(n, 1),
                            "retrieval_cpu_s_per_image": c_ret / max(n, 1),
                            "verification_cpu_s_per_image": c_ver / max(n, 1),
                            "notes": s.notes})
    class_sizes: dict[str, int] = {}
    for lm in train.landmarks:
        class_sizes[lm] = class_sizes.get(lm, 0) + 1
    for _, lm, _ in train.missing:
        class_sizes[lm] = class_sizes.get(lm, 0) + 1
    flagged = flag_classes(candidates, settings, class_sizes)
    _write_json(out / "candidates.json", candidates)
    _write_json(out / "flagged.json", {"audit": audit_id, "settings": settings.to_json(), "classes": flagged})
    summary = {
        "version": AUDIT_VERSION, "audit_id": audit_id, "train_csv": str(Path(train_csv).resolve()),
        "images": str(Path(images).resolve()), "index": str(index_dir.resolve()),
        "train_images": len(train), "train_classes": len(set(train.landmarks)), "train_missing": len(train.missing),
        "model": extract_settings.model, "extract": extract_settings.to_json(), "settings": settings.to_json(),
        "sv": {k: v for k, v in asdict(cfg).items()}, "eval_sets": per_set, "flagged": len(flagged),
        "index_seconds": t_index, "warnings": warnings,
    }
    text = summary_text(summary, flagged, out)
    eval_images = {(e.set, e.name): e for s in sets for e in s.images}
    render_review(out / "review.html", audit_id, flagged, eval_images, train, settings,
                  feature_dir=out / "features", train_cache=index_dir / "sv", train_hashes=hashes, summary=text,
                  progress=progress)
    _write_json(out / "audit.json", summary)
    atomic_write_bytes(out / "summary.txt", (text + "\n").encode())
    log(text)
    return summary


def _seconds(files) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) recorded in work files, summed."""
    wall = cpu = 0.0
    for f in files:
        try:
            d = json.loads(f.read_bytes())
            wall += float(d.get("seconds", 0.0))
            cpu += float(d.get("cpu_seconds", 0.0))
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return wall, cpu


def summary_text(s: dict, flagged: list[dict], out: Path) -> str:
    lines = [f"glimr audit {s['audit_id']}: {s['train_images']} training images in {s['train_classes']} classes"
             + (f" ({s['train_missing']} listed images missing, skipped)" if s["train_missing"] else "")
             + f"; model {s['model']}, top {s['settings']['top']}, verified = >= {s['settings']['min_inliers']} "
               "inliers"]
    for e in s["eval_sets"]:
        lines.append(f"  {e['name']}: {e['eval_images']} eval images, {e['pairs_verified']} pairs verified, "
                     f"{e['eval_images_with_verified_pair']} eval images with a verified pair; per eval image: "
                     f"retrieval {e['retrieval_s_per_image']:.3f} s ({e['retrieval_cpu_s_per_image']:.3f} s CPU), "
                     f"verification of its candidates {e['verification_s_per_image']:.3f} s "
                     f"({e['verification_cpu_s_per_image']:.3f} s CPU)")
    lines.append(f"flagged {len(flagged)} classes (ranked by evidence in {out / 'flagged.json'})"
                 + (": " + ", ".join(f"{c['landmark_id']} ({c['eval_images']} eval img, {c['max_inliers']} inliers)"
                                     for c in flagged[:10]) + (" ..." if len(flagged) > 10 else "") if flagged else ""))
    lines.append(f"review them in {out / 'review.html'}, export decisions.json, then:\n"
                 f"  glimr audit apply {out} --decisions decisions.json --out train_clean.csv")
    return "\n".join(lines)


def _read_audit(d: Path) -> dict:
    f = d / "audit.json"
    try:
        a = json.loads(f.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"'{f}' not found: AUDIT_DIR must be a folder written by `glimr audit`") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"'{f}' cannot be read ({e}); run `glimr audit` again into this folder") from None
    if not isinstance(a, dict) or a.get("version") != AUDIT_VERSION or "audit_id" not in a:
        raise ValueError(f"'{f}' is not an audit record of this glimr version; run `glimr audit` again")
    return a


# ------------------------------------------------------------------------------------------ apply
def read_decisions(path, audit_id: str) -> dict[str, str]:
    p = Path(path)
    try:
        d = json.loads(p.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"decisions file '{p}' not found: export it from AUDIT_DIR/review.html") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"'{p}' is not a readable decisions file ({e}); export it again from review.html") from None
    if not isinstance(d, dict) or not isinstance(d.get("decisions"), dict):
        raise ValueError(f"'{p}': expected {{\"audit\": ..., \"decisions\": {{landmark_id: \"confirm\" | "  # noqa: TRY004
                         f"\"reject\"}}}} as review.html exports it")
    if d.get("audit") not in (None, audit_id):
        raise ValueError(f"'{p}' holds decisions of audit {d.get('audit')!r}, but this AUDIT_DIR is audit "
                         f"{audit_id!r}: export the decisions from this audit's review.html")
    out = {}
    for lm, v in d["decisions"].items():
        if v not in ("confirm", "reject"):
            raise ValueError(f"'{p}': the decision for landmark {lm} is {v!r}; use \"confirm\" or \"reject\"")
        out[str(lm)] = v
    return out


def apply_decisions(audit_dir, decisions, out_csv, *, log=print) -> dict:
    """Write ``out_csv``: the audited training CSV without every image of the confirmed classes; write
    AUDIT_DIR/report.md and report.json (the paper's Table 2 per eval set, Table 3 for the training set)."""
    from glimr.data.gldv2 import filter_csv, read_gldv2_rows

    d = Path(audit_dir)
    a = _read_audit(d)
    dec = read_decisions(decisions, a["audit_id"])
    csv_path = Path(a["train_csv"])
    _, rows = read_gldv2_rows(csv_path)
    sizes: dict[str, int] = {}
    for _, lm, _ in rows:
        sizes[lm] = sizes.get(lm, 0) + 1
    unknown = sorted(set(dec) - set(sizes))
    if unknown:
        raise ValueError(f"'{decisions}' decides landmark(s) {unknown[:5]} that '{csv_path}' does not list: is it "
                         "this audit's decisions file?")
    if Path(out_csv).resolve() == csv_path.resolve():
        raise ValueError(f"--out '{out_csv}' is the audited CSV itself: write the cleaned CSV to another file")
    confirmed = {lm for lm, v in dec.items() if v == "confirm"}
    flagged = json.loads((d / "flagged.json").read_bytes())["classes"]
    undecided = [c["landmark_id"] for c in flagged if c["landmark_id"] not in dec]
    counts = filter_csv(csv_path, out_csv, confirmed)
    min_inl = a["settings"]["min_inliers"]
    cand = json.loads((d / "candidates.json").read_bytes())
    table = []
    tot_eval = tot_dupl = 0
    all_gids: set[str] = set()
    for e in a["eval_sets"]:
        vp = [r for r in cand if r["eval_set"] == e["name"] and r["inliers"] >= min_inl
              and str(r["landmark_id"]) in confirmed]
        dupl_eval = len({r["eval_image"] for r in vp})
        gids = {str(r["landmark_id"]) for r in vp}
        all_gids |= gids
        table.append({"eval": e["name"], "eval_images": e["eval_images"], "dupl_eval": dupl_eval,
                      "dupl_gid": len(gids), "dupl_img": sum(sizes[g] for g in gids), "gids": sorted(gids)})
        tot_eval += e["eval_images"]
        tot_dupl += dupl_eval
    other = confirmed - all_gids   # confirmed without a verified pair (e.g. by name, as the paper also did)
    total = {"eval": "TOTAL", "eval_images": tot_eval, "dupl_eval": tot_dupl, "dupl_gid": len(confirmed),
             "dupl_img": sum(sizes[g] for g in confirmed), "gids": sorted(confirmed)}
    name = Path(out_csv).name
    md = [("Table 2 form (CiDeR/RGLDv2-clean): duplicate landmarks between the eval sets and the training set, "
          "confirmed by review"), "",
          "| EVAL | #EVAL IMG | #DUPL EVAL | #DUPL TRAIN GID | #DUPL TRAIN IMG |", "|---|---:|---:|---:|---:|"]
    for r in table + [total]:
        pct = f" ({100 * r['dupl_eval'] / r['eval_images']:.0f}%)" if r["eval_images"] and r is not total else ""
        md.append(f"| {r['eval']} | {r['eval_images']} | {r['dupl_eval']}{pct} | {r['dupl_gid']} | {r['dupl_img']} |")
    md += ["", "Table 3 form: the training set before and after", "",
           "| TRAINING SET | #IMAGES | #CATEGORIES |", "|---|---:|---:|",
           f"| {csv_path.name} | {counts['images_before']} | {counts['classes_before']} |",
           f"| {name} (audited) | {counts['images_after']} | {counts['classes_after']} |", "",
           f"removed: {len(confirmed)} classes, {sum(counts['removed'].values())} images"
           + (f" ({', '.join(sorted(confirmed)[:20])}{' ...' if len(confirmed) > 20 else ''})" if confirmed else ""),
           f"rejected: {sum(v == 'reject' for v in dec.values())} classes (kept)"]
    if other:
        md.append(f"confirmed without a verified pair in these eval sets (counted in TOTAL only): {sorted(other)}")
    if undecided:
        md.append(f"undecided: {len(undecided)} flagged classes have no decision and are KEPT: "
                  f"{', '.join(undecided[:20])}{' ...' if len(undecided) > 20 else ''}")
    report = {"audit_id": a["audit_id"], "decisions": str(Path(decisions).resolve()), "out": str(Path(out_csv)),
              "table2": table + [total], "table3": counts, "undecided": undecided}
    text = "\n".join(md)
    atomic_write_bytes(d / "report.md", (text + "\n").encode())
    _write_json(d / "report.json", report)
    log(text)
    log(f"-> {out_csv}")
    return report
