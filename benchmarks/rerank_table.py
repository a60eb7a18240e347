"""Re-ranking on Clutter-UKB dev, in the layout of Table 7 of Hu & Bors (Neural Networks 2023).

Rows: the global ranking (one scale, the reference; and the co-attention scale set, from the same forward
pass as the co-attention features), + alpha-QE, + diffusion, + co-attention, co-attention + alpha-QE;
then the storage ablation of the co-attention records (K, D', dtype: bytes per image vs mAP), the inverted
file and the shortlist. Columns: mAP (and mP@1) on Medium and Hard.

    PYTHON=.venv/bin/python ../shared/tools/build_clutter_dev.sh bench-data     # once
    python benchmarks/rerank_table.py                                          # ~1 h on 2 busy CPU cores
    python benchmarks/rerank_table.py --pilot 20                               # a quick subset

Writes benchmarks/results/rerank_clutter.md and .json. Everything extracted is cached under
bench-data/cache/coattention (per image: the co-attention features before PCA and the selected local
features), so the table is recomputed in minutes. The PCA and the codebook are learned from
../shared/data/photos (never from UKBench, whose objects are the benchmark's), at one scale.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glimr.eval import metrics as M  # noqa: E402
from glimr.eval.evaluate import extract_descriptors, load_eval_set, model_identity, rank_by_inner_product  # noqa: E402
from glimr.extract.local import (PAPER_SCALES, CoAttentionParams, LocalConfig, extract_local, fit_params, load_locals,  # noqa: E402
                                 model_pooling, recluster, sample_items, save_locals)
from glimr.extract.multiscale import parse_scales  # noqa: E402
from glimr.io.images import list_images  # noqa: E402
from glimr.models.registry import DEFAULT_MODEL, build_model  # noqa: E402
from glimr.rerank.coattention import CoAttentionIndex, rerank_coattention  # noqa: E402
from glimr.rerank.diffusion import rerank_diffusion  # noqa: E402
from glimr.rerank.qe import rerank_alpha_qe  # noqa: E402


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_locals(cache: Path, name: str, model, items, boxes, cfg: LocalConfig, scales, max_size, workers,
                  ident) -> tuple[list, np.ndarray]:
    """(ImageLocal per item, multi-scale global descriptors) from one forward pass per view, cached."""
    key = _key(ident, [str(p) for p in items], boxes, list(scales), max_size, cfg.n_select, cfg.clusters,
               cfg.kmeans_iters, cfg.p)
    d = cache / f"{name}__{key}"
    if (d / "locals.json").is_file() and (d / "global.npy").is_file():
        return load_locals(d), np.load(d / "global.npy")
    t0 = time.perf_counter()
    res, locs = extract_local(model, [str(p) for p in items], cfg=cfg, scales=scales, max_size=max_size,
                              boxes=boxes, workers=workers, desc=name)
    if res.errors:
        raise RuntimeError(f"{name}: {len(res.errors)} images failed, e.g. {next(iter(res.errors.values()))}")
    save_locals(d, [locs.get(i) for i in range(len(items))])
    np.save(d / "global.npy", res.descriptors)
    (d / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return load_locals(d), res.descriptors


def score(evalset, ranks) -> dict:
    m, _ = evalset.score(ranks)
    return {"mAP": round(m["mAP"], 2), "mP@1": round(m.get("mP@1", float("nan")), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "bench-data"))
    ap.add_argument("--levels", nargs="+", default=["medium", "hard"])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--scales", default="paper", help='"paper" (1/(2 sqrt 2) .. sqrt 2), 1, 3, 5 or a list')
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--samples", default=str(ROOT.parent / "shared" / "data" / "photos"))
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--cache", default=str(ROOT / "bench-data" / "cache" / "coattention"))
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/rerank_clutter_MODEL)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pilot", type=int, default=0, help="only the first N queries, their positives and 4N "
                                                         "negatives (a quick check; not the benchmark)")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads were 4x slower than 1)")
    args = ap.parse_args(argv)
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)

    scales = PAPER_SCALES if args.scales == "paper" else parse_scales(args.scales)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, checkpoint=args.checkpoint)
    ident = model_identity(model, args.model, args.checkpoint)
    model_qs = tuple(model.config.get("query_scales") or ()) if tuple(model.config.get("query_scales") or (1.0,)) \
        != (1.0,) else ()
    G = "GeM" if model.name.startswith("gem-") else "global"
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / f"rerank_clutter_{model.name}")
    base = LocalConfig()                                   # the paper: N=500, K=10, D'=512, T=10
    p, w, b = model_pooling(model)
    t_start = time.perf_counter()

    # sample images for the PCA (sec. 5.1) and the codebook (sec. 5.2): photos, one scale
    samples = sample_items(list_images(args.samples), args.n_samples)
    s_locs, _ = cached_locals(cache, "samples", model, samples, None, base, (1.0,), args.max_size, args.workers,
                              ident)
    s_locs = [x for x in s_locs if x is not None]

    results: dict = {"rows": {}, "ablation": {}, "meta": {}}
    data: dict = {}
    for level in args.levels:
        ev = load_eval_set(Path(args.data) / f"clutter-dev-{level}")
        if args.pilot:
            nq = args.pilot
            pos = sorted({j for q in range(nq) for j in ev_positives(ev, q)})
            neg = [j for j in range(len(ev.db_paths)) if j not in set(_all_pos(ev))][:4 * nq]
            ev = subset(ev, list(range(nq)), pos + neg)
        q_locs, q_ms = cached_locals(cache, f"{ev.name}-query", model, ev.query_paths, ev.query_boxes, base, scales,
                                     args.max_size, args.workers, ident)
        db_locs, db_ms = cached_locals(cache, f"{ev.name}-db", model, ev.db_paths, None, base, scales,
                                       args.max_size, args.workers, ident)
        g1 = extract_descriptors(model, ev, scales=(1.0,), query_scales=(1.0,), max_size=args.max_size,
                                 workers=args.workers, cache_dir=Path(args.cache).parent, model_id=ident)
        gm = None
        if model_qs:            # the model's own protocol: database at one scale, queries over its pyramid
            gm = extract_descriptors(model, ev, scales=(1.0,), query_scales=model_qs, max_size=args.max_size,
                                     workers=args.workers, cache_dir=Path(args.cache).parent, model_id=ident)
        data[level] = (ev, q_locs, db_locs, q_ms, db_ms, g1, gm)

    params_cache: dict = {}

    def adapt(locs, cfg: LocalConfig):
        """The cached features (N=500, K=10) re-clustered for another K or N."""
        if cfg.clusters == base.clusters and cfg.n_select == base.n_select:
            return locs
        return [recluster(x, cfg.clusters, p, w, b, n_select=cfg.n_select) for x in locs]

    codebooks: dict = {}

    def params_for(cfg: LocalConfig):
        """PCA per setting; the codebook depends only on its own settings: learned once per (size, dim)."""
        k = json.dumps(cfg.to_json(), sort_keys=True)
        if k not in params_cache:
            prm = fit_params(adapt(s_locs, cfg), replace(cfg, max_words=0))
            cb = None
            if cfg.max_words:
                ck = (cfg.codebook_size, cfg.codebook_dim, cfg.ivf_features)
                if ck not in codebooks:
                    codebooks[ck] = fit_params(s_locs, replace(base, dim=8, proxy_dim=8, max_words=cfg.max_words,
                                                               codebook_size=cfg.codebook_size,
                                                               codebook_dim=cfg.codebook_dim,
                                                               ivf_features=cfg.ivf_features)).codebook
                cb = codebooks[ck]
            params_cache[k] = CoAttentionParams(cfg, prm.pca, prm.scale, cb, prm.meta)
        return params_cache[k]

    def ca_ranks(level, cfg: LocalConfig, prior, **kw):
        ev, q_locs, db_locs, *_ = data[level]
        prm = params_for(cfg)
        q_locs, db_locs = adapt(q_locs, cfg), adapt(db_locs, cfg)
        codec = prm.codec
        recs = np.stack([prm.encode(x) for x in db_locs])
        idx = CoAttentionIndex.from_records(recs, codec, prm.codebook.size if prm.codebook else None)
        qv = np.stack([prm.query_vector(x) for x in q_locs])
        qw = [prm.query_words(x) for x in q_locs]
        ranks = rerank_coattention(qv, idx, qw, prior, **kw)
        cand = np.mean([idx.candidates(x).mean() for x in qw]) if idx.ivf is not None else 1.0
        return ranks, idx.bytes_per_image(), float(cand)

    def row(name, fn):
        out = {}
        for level in args.levels:
            t0 = time.perf_counter()
            r = fn(level)
            extra = {}
            if isinstance(r, tuple):
                r, bpi, cand = r
                extra = {"bytes_per_image": bpi, "ivf_kept": round(cand, 3)}
            out[level] = {**score(data[level][0], r), **extra, "seconds": round(time.perf_counter() - t0, 2)}
        results["rows"][name] = out
        print(name, json.dumps(out), flush=True)

    def glob_ranks(level, ms=True):
        ev, _, _, q_ms, db_ms, g1, _ = data[level]
        q, db = (q_ms, db_ms) if ms else (g1.q, g1.db)
        return q, db, rank_by_inner_product(q, db)

    def model_ranks(level):
        g = data[level][6]
        return g.q, g.db, rank_by_inner_product(g.q, g.db)

    sc_label = "paper 5" if args.scales == "paper" else args.scales
    paper = replace(base, dtype="float32", max_words=0)
    row(f"{G} (1 scale)", lambda lv: glob_ranks(lv, False)[2])
    if model_qs:
        # the model's own protocol first: the global ranking every re-ranker below should improve on
        qs_label = ",".join(f"{x:g}" for x in model_qs)
        row(f"{G} (model protocol: database 1 scale, queries {qs_label})", lambda lv: model_ranks(lv)[2])
        row(f"{G} (model protocol) + aQE", lambda lv: rerank_alpha_qe(*model_ranks(lv), n=2, alpha=3.0))
        row(f"{G} (model protocol) + DF (k=50, alpha=0.99)", lambda lv: rerank_diffusion(*model_ranks(lv)))
        row(f"{G} (model protocol) + CA (paper)", lambda lv: ca_ranks(lv, paper, model_ranks(lv)[2], ivf=False))
        row(f"{G} (model protocol) + CA + aQE (paper)",
            lambda lv: ca_ranks(lv, paper, model_ranks(lv)[2], ivf=False, qe=2, alpha=3.0))
    row(f"{G} ({sc_label} scales)", lambda lv: glob_ranks(lv)[2])
    row(f"{G} + aQE", lambda lv: rerank_alpha_qe(*glob_ranks(lv), n=2, alpha=3.0))
    row(f"{G} + DF (Iscen et al.: k=50, alpha=0.99)", lambda lv: rerank_diffusion(*glob_ranks(lv)))
    row(f"{G} + DF (k=4, alpha=0.8: chosen on UKBench)", lambda lv: rerank_diffusion(*glob_ranks(lv), k=4, kq=4,
                                                                                      alpha=0.8))
    row(f"{G} + CA (paper: K=10, D'=512, float32, no IVF)",
        lambda lv: ca_ranks(lv, paper, glob_ranks(lv)[2], ivf=False))
    row(f"{G} + CA + aQE (paper)", lambda lv: ca_ranks(lv, paper, glob_ranks(lv)[2], ivf=False, qe=2, alpha=3.0))
    compact = LocalConfig.compact()
    row(f"{G} + CA (compact: D'=256 int8, IVF)", lambda lv: ca_ranks(lv, compact, glob_ranks(lv)[2]))
    row(f"{G} + CA + aQE (compact)", lambda lv: ca_ranks(lv, compact, glob_ranks(lv)[2], qe=2, alpha=3.0))

    # The paper's model has a learned whitening FC; the off-the-shelf one has none. PCA-whitening learned from
    # the same sample images stands in for it (not in the paper): for the global descriptors too, to compare fairly.
    from glimr.extract.local import PCA as _PCA, l2n_np  # noqa: PLC0415

    pw = _PCA.fit(l2n_np(np.stack([x.global_ for x in s_locs])), base.dim, whiten=True)

    def glob_pw(level):
        q, db, _ = glob_ranks(level)
        q2, db2 = l2n_np(pw.apply(q)), l2n_np(pw.apply(db))
        return q2, db2, rank_by_inner_product(q2, db2)

    row(f"{G} ({sc_label} scales) + PCA-whitening {base.dim} (not in the paper)", lambda lv: glob_pw(lv)[2])
    row(f"{G} + PCA-whitening + aQE", lambda lv: rerank_alpha_qe(*glob_pw(lv), n=2, alpha=3.0))
    pwc = replace(paper, pca_whiten=True)
    row(f"{G} + CA, PCA-whitened (K=10, D'=512, float32)", lambda lv: ca_ranks(lv, pwc, glob_ranks(lv)[2], ivf=False))
    row(f"{G} + CA + aQE, PCA-whitened", lambda lv: ca_ranks(lv, pwc, glob_ranks(lv)[2], ivf=False, qe=2, alpha=3.0))
    pwcc = replace(compact, pca_whiten=True)
    row(f"{G} + CA, PCA-whitened (compact)", lambda lv: ca_ranks(lv, pwcc, glob_ranks(lv)[2]))
    row(f"{G} + CA + aQE, PCA-whitened (compact)", lambda lv: ca_ranks(lv, pwcc, glob_ranks(lv)[2], qe=2, alpha=3.0))

    if not args.no_ablation:
        def abl(name, cfg, **kw):
            out = {}
            for level in args.levels:
                r, bpi, cand = ca_ranks(level, cfg, glob_ranks(level)[2], **kw)
                out[level] = {**score(data[level][0], r), "bytes_per_image": bpi, "ivf_kept": round(cand, 3)}
            results["ablation"][name] = out
            print("  ablation", name, json.dumps(out), flush=True)

        nowords = dict(max_words=0)
        for dim, dt in ((512, "float16"), (512, "int8"), (256, "float32"), (256, "float16"), (128, "float16"),
                        (128, "int8"), (64, "float16")):
            abl(f"K=10 D'={dim} {dt}", replace(base, dim=dim, dtype=dt, proxy_dim=min(64, dim), **nowords), ivf=False)
        for k in (1, 5, 16):
            abl(f"K={k} D'=256 int8", replace(base, clusters=k, dim=256, dtype="int8", **nowords), ivf=False)
        for k, dim, mw in ((8, 320, 64), (6, 448, 64), (6, 512, 64)):      # other ways to stay under 4 KB
            abl(f"K={k} D'={dim} int8, {mw} words", replace(base, clusters=k, dim=dim, dtype="int8", max_words=mw),
                ivf=False)
        for t in (1.0, 5.0, 20.0):
            abl(f"T={t:g} (compact)", compact, ivf=False, temperature=t)
        abl("pool=norm (compact)", compact, ivf=False, pool="norm")
        abl("no IVF (compact)", compact, ivf=False)
        abl("IVF fallback=last (compact)", compact, fallback="last")
        for sl in (50, 200):
            for by in ("votes", "proxy"):
                abl(f"IVF + shortlist {sl} by {by} (compact)", compact, shortlist=sl, shortlist_by=by)
        abl("IVF codebook 1024 (compact)", replace(compact, codebook_size=1024))
        for nsel in (200, 1000):
            if nsel <= base.n_select:
                abl(f"N={nsel} (compact)", replace(compact, n_select=nsel), ivf=False)

    results["meta"] = {
        "command": "python benchmarks/rerank_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "model": args.model,
        "checkpoint": args.checkpoint, "scales": list(scales), "max_size": args.max_size,
        "pca_samples": f"{len(s_locs)} images of {args.samples} at scale 1",
        "params": {"N": base.n_select, "K": base.clusters, "T": 10, "aQE": {"n": 2, "alpha": 3},
                   "diffusion": {"k": 50, "kq": 10, "gamma": 3, "alpha": 0.99, "truncate": 1000}},
        "pilot": args.pilot, "seconds": round(time.perf_counter() - t_start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(results, args.levels))
    print(render(results, args.levels))
    return 0


def ev_positives(ev, q) -> list[int]:
    return sorted(ev.relevant(q)[0])


def _all_pos(ev) -> list[int]:
    return sorted({j for q in range(len(ev.query_paths)) for j in ev.relevant(q)[0]})


def subset(ev, qs: list[int], dbs: list[int]):
    """An EvalSet restricted to some queries and database images (for --pilot)."""
    from glimr.eval.evaluate import EvalSet  # noqa: PLC0415

    pos = [sorted(ev.relevant(q)[0]) for q in qs]
    remap = {j: i for i, j in enumerate(dbs)}
    positives = [[remap[j] for j in pp if j in remap] for pp in pos]

    def sc(ranks):
        r = M.gnd_json_eval(ranks, positives, None, (1, 3))
        return r.as_dict(), []

    return EvalSet(name=f"{ev.name}-pilot{len(qs)}", title=ev.title + " (pilot subset)", kind=ev.kind,
                   query_paths=[ev.query_paths[q] for q in qs], db_paths=[ev.db_paths[j] for j in dbs],
                   query_boxes=[ev.query_boxes[q] for q in qs] if ev.query_boxes else None, score=sc,
                   relevant=lambda q: (set(positives[q]), set()))


def render(results: dict, levels) -> str:
    m = results["meta"]
    lv = [x.capitalize() for x in levels]
    head = ("| Method | " + " | ".join(f"{x} mAP" for x in lv) + " | " + " | ".join(f"{x} mP@1" for x in lv)
            + " | bytes/image |")
    sep = "|---" * (2 + 2 * len(levels)) + "|"
    lines = ["# Re-ranking on Clutter-UKB dev (layout of Table 7, Hu & Bors 2023)", "",
             f"Model {m['model']}" + (f" (checkpoint {m['checkpoint']})" if m.get("checkpoint") else "")
             + f"; co-attention scales {', '.join(f'{s:g}' for s in m['scales'])} at longest side {m['max_size']};"
             f" PCA and codebook from {m['pca_samples']}. N={m['params']['N']}, K={m['params']['K']}, T=10; "
             f"aQE n=2, alpha=3; diffusion gamma=3, truncated to 1000, kq=10 (Iscen) or 4.",
             f"Command: `{m['command']}` ({m['date']}, {m['seconds']:.0f} s)." + (" PILOT SUBSET." if m["pilot"] else ""),
             "", head, sep]

    def cells(r):
        bpi = next((r[x].get("bytes_per_image") for x in levels if r[x].get("bytes_per_image")), None)
        b = f"{bpi['total']:.0f}" if bpi else "-"
        return (" | ".join(f"{r[x]['mAP']:.1f}" for x in levels) + " | "
                + " | ".join(f"{r[x]['mP@1']:.1f}" for x in levels) + f" | {b} |")

    for name, r in results["rows"].items():
        lines.append(f"| {name} | " + cells(r))
    if results.get("ablation"):
        lines += ["", "## Co-attention ablation (storage, K, T, inverted file)", "", head, sep]
        for name, r in results["ablation"].items():
            lines.append(f"| {name} | " + cells(r))
        lines += ["", "ivf_kept (fraction of the database sharing a visual word with the query) and timings are "
                      "in the JSON."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
