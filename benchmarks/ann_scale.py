"""Global search at 1M and 10M x 512-d on one machine: which FAISS structure, at what cost and recall.

    nice -n 15 python benchmarks/ann_scale.py --data /work/ann-data --sizes 1000000,10000000

Descriptors. Real: gem-lite0 (off the shelf, longest side 512, one scale: 1280-d; the default gem-lite2-realw
ran at ~1.5 images/s on the shared machine, too slow for the time we had) on the 1,000 photos of
../shared/data/photos and the 279 of ../shared/data/train-real
(`glimr extract DIR --model gem-lite0 --out DATA/photos_lite0.npz`, `... DATA/trainreal_lite0.npz`),
projected to 512-d by a PCA fitted on them (whitening off), L2-normalised. 200 photos are held out as queries;
the other real descriptors seed the synthetic ones. Synthetic, drawn to match them (hierarchical Gaussian
mixture in the PCA coordinates, covariance = the real descriptors' PCA eigenvalues):
  instance centre = normalize(seed + h1 * sqrt(eig) * z)    seed: a random real descriptor, z ~ N(0, I)
  image           = normalize(centre + h2 * sqrt(eig) * z')  1 to 7 images per centre (mean 4, like UKBench)
h1 is set so that the median cosine centre-seed equals the median cosine of two photos of one train-real
webcam scene (the same place at another time), h2 so that the median cosine image-centre equals the median
cosine of two consecutive photos of the train-real lund street walk (overlapping views of one street). Rows are written in order to a float32
memmap (DATA/vectors.f32, 10M x 512 = 20 GB); the 1M set is its first 1M rows.
Queries (200): the 100 first held-out real photos plus 100 new views of instance centres of the first 1M rows
(an image of a known instance that is not in the database). Ground truth: exact top-100 by inner product,
streamed through the memmap in chunks with numpy/BLAS.

ms per query: each setting is run once first (reading the rows its shortlists need, from disk where they are not
cached: ms_per_query_first_pass), then timed with the same queries at 1 and 2 threads (rows in the page cache).
For each structure: build time (train on a sample + add in chunks; a structure is trained once, on a sample of
the first size's rows, and that training is reused at 10M: build_s = its training time + the add time), file bytes per vector, resident memory of
the loaded search structure (RSS growth when loaded with IO_FLAG_MMAP, and after the timed searches), ms per
query (one query per call, 1 and 2 threads) and recall@10 / recall@100 after exact re-ranking of a shortlist
from the stored vectors (the memmap). Everything is cached under --data: a rerun resumes.
Writes benchmarks/results/ann_scale.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# OpenMP threads that spin while waiting collapse when other jobs share the cores (a FAISS training measured 25 s
# with spinning 2 threads against 0.8 s passive): wait passively, before numpy/FAISS load OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DIM = 512
NQ_REAL, NQ_SYN = 100, 100
GT_K = 100
BLOCK = 500_000


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def rss() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


# ---- real descriptors -> PCA 512 --------------------------------------------------------------------
def real_model(data: Path) -> dict:
    cache = data / "real_pca512.npz"
    if cache.exists():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    ph = np.load(data / "photos_lite0.npz")
    tr = np.load(data / "trainreal_lite0.npz")
    X = np.concatenate([ph["descriptors"], tr["descriptors"]]).astype(np.float64)
    names = np.concatenate([ph["names"], np.array(["train-real/" + str(n) for n in tr["names"]])])
    mean = X.mean(0)
    _, S, Vt = np.linalg.svd(X - mean, full_matrices=False)
    P = Vt[:DIM]                                    # 512 x 1280
    eig = (S[:DIM] ** 2) / (len(X) - 1)
    Y = (X - mean) @ P.T
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    n_ph = len(ph["descriptors"])
    q = np.sort(rng.choice(n_ph, NQ_REAL, replace=False))
    seeds = np.setdiff1d(np.arange(len(Y)), q)
    # targets (real photos of train-real): two photos of one webcam scene (the same place at another time:
    # centre-seed), two consecutive photos of the lund street walk (overlapping views: image-centre)
    scene = np.array([n.split("/")[2] if n.startswith("train-real/webcam/") else "" for n in names])
    same = []
    for sc in set(scene) - {""}:
        idx = np.flatnonzero(scene == sc)
        c = Y[idx] @ Y[idx].T
        same.append(c[np.triu_indices(len(idx), 1)])
    t_inst = float(np.median(np.concatenate(same)))
    lund = np.array(sorted(i for i, n in enumerate(names) if n.startswith("train-real/lund/")))
    lund = lund[np.argsort(names[lund])]
    t_view = float(np.median((Y[lund[:-1]] * Y[lund[1:]]).sum(1)))
    out = {"Y": Y.astype(np.float32), "eig": eig.astype(np.float32), "q": q, "seeds": seeds, "t_inst": t_inst,
           "t_view": t_view, "explained": float((S[:DIM] ** 2).sum() / (S ** 2).sum())}
    np.savez(cache, **out)
    return {k: np.asarray(v) for k, v in out.items()}


def _h_for(target: float, base: np.ndarray, sd: np.ndarray, rng) -> float:
    """h such that the median cosine of normalize(base + h * sd * z) with base is ``target`` (bisection)."""
    lo, hi = 0.0, 50.0
    z = rng.standard_normal((len(base), len(sd))).astype(np.float32) * sd
    for _ in range(40):
        h = (lo + hi) / 2
        v = base + h * z
        c = np.median((v * base).sum(1) / np.linalg.norm(v, axis=1))
        lo, hi = (h, hi) if c > target else (lo, h)
    return (lo + hi) / 2


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(data: Path, n_total: int, rm: dict) -> dict:
    """Write DATA/vectors.f32 (n_total x 512) block by block (resumable); returns the generator's parameters."""
    state_p = data / "gen.json"
    state = json.loads(state_p.read_text()) if state_p.exists() else {}
    Y, eig, seeds = rm["Y"], rm["eig"], rm["seeds"]
    sd = np.sqrt(eig).astype(np.float32)
    if "h1" not in state:
        rng = np.random.default_rng(1)
        base = Y[rng.choice(seeds, 2000)]
        h1 = _h_for(float(rm["t_inst"]), base, sd, rng)
        cen = _norm(base + h1 * rng.standard_normal(base.shape).astype(np.float32) * sd)
        h2 = _h_for(float(rm["t_view"]), cen, sd, rng)
        state = {"n_total": n_total, "h1": h1, "h2": h2, "blocks_done": []}
        state_p.write_text(json.dumps(state))
    if state["n_total"] < n_total:
        raise SystemExit(f"{state_p} was made for {state['n_total']} rows; use another --data folder")
    n_total = state["n_total"]  # a run of the smaller sizes alone reuses the bigger file
    h1, h2 = state["h1"], state["h2"]
    path = data / "vectors.f32"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(n_total * DIM * 4)
    mm = np.memmap(path, dtype=np.float32, mode="r+", shape=(n_total, DIM))
    nb = (n_total + BLOCK - 1) // BLOCK
    for b in range(nb):
        if b in state["blocks_done"]:
            continue
        t0 = time.time()
        rng = np.random.default_rng(1000 + b)
        rows = min(BLOCK, n_total - b * BLOCK)
        counts = rng.integers(1, 8, size=rows // 2)
        counts = counts[: np.searchsorted(np.cumsum(counts), rows) + 1]
        counts[-1] -= counts.sum() - rows
        n_c = len(counts)
        cen = np.empty((n_c, DIM), np.float32)
        for s in range(0, n_c, 100_000):
            e = min(n_c, s + 100_000)
            base = Y[rng.choice(seeds, e - s)]
            cen[s:e] = _norm(base + h1 * rng.standard_normal((e - s, DIM), dtype=np.float32) * sd)
        owner = np.repeat(np.arange(n_c), counts)
        for s in range(0, rows, 100_000):
            e = min(rows, s + 100_000)
            v = cen[owner[s:e]] + h2 * rng.standard_normal((e - s, DIM), dtype=np.float32) * sd
            mm[b * BLOCK + s:b * BLOCK + e] = _norm(v)
        if b == 0:  # synthetic queries: new views of the first centres
            qrng = np.random.default_rng(7)
            pick = qrng.choice(n_c, NQ_SYN, replace=False)
            qs = _norm(cen[pick] + h2 * qrng.standard_normal((NQ_SYN, DIM), dtype=np.float32) * sd)
            np.save(data / "queries_syn.npy", qs.astype(np.float32))
        mm.flush()
        state["blocks_done"].append(b)
        state_p.write_text(json.dumps(state))
        log(f"generated block {b + 1}/{nb} ({rows} rows) in {time.time() - t0:.1f} s")
    del mm
    return state


def queries(data: Path, rm: dict) -> np.ndarray:
    return np.concatenate([rm["Y"][rm["q"]], np.load(data / "queries_syn.npy")]).astype(np.float32)


def ground_truth(data: Path, n: int, Q: np.ndarray) -> np.ndarray:
    p = data / f"gt_{n}.npy"
    if p.exists():
        return np.load(p)
    t0 = time.time()
    X = np.memmap(data / "vectors.f32", dtype=np.float32, mode="r", shape=(n, DIM))
    best_s = np.full((len(Q), GT_K), -np.inf, np.float32)
    best_i = np.full((len(Q), GT_K), -1, np.int64)
    step = 250_000
    for s in range(0, n, step):
        e = min(n, s + step)
        sc = Q @ np.asarray(X[s:e]).T
        part = np.argpartition(-sc, GT_K, axis=1)[:, :GT_K]
        cs = np.concatenate([best_s, np.take_along_axis(sc, part, 1)], 1)
        ci = np.concatenate([best_i, part + s], 1)
        o = np.argsort(-cs, axis=1, kind="stable")[:, :GT_K]
        best_s, best_i = np.take_along_axis(cs, o, 1), np.take_along_axis(ci, o, 1)
        if (s // step) % 8 == 0:
            log(f"ground truth {n}: {e}/{n}")
    np.save(p, best_i)
    (data / f"gt_{n}.json").write_text(json.dumps({"seconds": time.time() - t0}))
    return best_i


# ---- structures ---------------------------------------------------------------------------------------
def build_one(data: Path, n: int, factory: str) -> dict:
    import faiss

    from glimr.index import ann

    tag = factory.replace(",", "__")
    path = data / f"ix_{n}_{tag}.index"
    meta = data / f"ix_{n}_{tag}.json"
    if path.exists() and meta.exists():
        return json.loads(meta.read_text())
    X = np.memmap(data / "vectors.f32", dtype=np.float32, mode="r", shape=(n, DIM))
    t0 = time.time()
    base = ann._base(factory, DIM)
    t_train = 0.0
    n_train = 0
    trained = data / f"trained_{tag}.index"  # one training per structure, reused at every size
    if not base.is_trained and trained.exists():
        base = faiss.read_index(str(trained))
        tm = json.loads((data / f"trained_{tag}.json").read_text())
        n_train, t_train = tm["train_vectors"], tm["train_s"]
        log(f"{factory} @ {n}: reusing the structure trained on {n_train} vectors of the first {tm['n']:,} rows")
    elif not base.is_trained:
        n_train = ann.train_count(factory, n)
        pick = np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))
        sample = np.ascontiguousarray(X[pick])
        base.train(sample)
        del sample
        t_train = time.time() - t0
        ann.save_index(base, trained)
        (data / f"trained_{tag}.json").write_text(json.dumps({"train_vectors": n_train, "train_s": t_train,
                                                              "n": n}))
        log(f"{factory} @ {n}: trained on {n_train} in {t_train:.0f} s")
    t_add0 = time.time()
    index = ann._wrap(base)
    for s in range(0, n, ann.ADD_CHUNK * 4):
        e = min(n, s + ann.ADD_CHUNK * 4)
        index.add_with_ids(np.ascontiguousarray(X[s:e]), np.arange(s, e, dtype=np.int64))
        if (s // (ann.ADD_CHUNK * 4)) % 10 == 0:
            log(f"{factory} @ {n}: added {e}/{n} ({time.time() - t0:.0f} s)")
    t_add = time.time() - t_add0
    t_build = t_train + t_add
    ann.save_index(index, path)
    m = {"factory": factory, "n": n, "train_vectors": n_train, "train_s": round(t_train, 1),
         "add_s": round(t_add, 1), "build_s": round(t_build, 1), "file_bytes": path.stat().st_size,
         "bytes_per_vector": round(path.stat().st_size / n, 2), "peak_rss_build": rss().get("VmHWM")}
    meta.write_text(json.dumps(m))
    log(f"{factory} @ {n}: built in {t_build:.0f} s, {m['bytes_per_vector']} B/vector")
    return m


def eval_one(data: Path, n: int, factory: str, sweep: list[tuple[int, int]]) -> dict:
    """Run in a fresh process: load (mmap unless flat), search every query one by one, re-rank."""
    import faiss

    from glimr.index import ann

    tag = factory.replace(",", "__")
    rm = real_model(data)
    Q = queries(data, rm)
    gt = np.load(data / f"gt_{n}.npy")
    X = np.memmap(data / "vectors.f32", dtype=np.float32, mode="r", shape=(n, DIM))
    r0 = rss()
    flat = factory == "Flat"
    index = ann.load_index(data / f"ix_{n}_{tag}.index", mmap=not flat)
    r1 = rss()
    out = {"rss_before_load": r0, "rss_after_load": r1,
           "resident_bytes_after_load": r1["VmRSS"] - r0["VmRSS"], "runs": []}
    for nprobe, shortlist in (sweep if not flat else [(0, 0)]):
        row = {"nprobe": nprobe, "shortlist": shortlist}
        # a first, untimed-for-the-table pass (2 threads): it reads the shortlists' rows that no earlier pass
        # read (from disk when they are not in the page cache); the timed passes then repeat the same queries
        faiss.omp_set_num_threads(2)
        t0 = time.perf_counter()
        for qi in range(len(Q)):
            ann.search(index, Q[qi:qi + 1], 10, X, nprobe=nprobe, shortlist=shortlist)
        row["ms_per_query_first_pass"] = round(1000 * (time.perf_counter() - t0) / len(Q), 3)
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            ids_all = np.empty((len(Q), GT_K), np.int64)
            t = []
            for qi in range(len(Q)):
                t0 = time.perf_counter()
                _, ids = ann.search(index, Q[qi:qi + 1], GT_K if flat or shortlist >= GT_K else 10, X,
                                    nprobe=nprobe, shortlist=shortlist)
                t.append(time.perf_counter() - t0)
                ids_all[qi, :ids.shape[1]] = ids[0]
                ids_all[qi, ids.shape[1]:] = -1
            row[f"ms_per_query_{threads}t"] = round(1000 * float(np.mean(t)), 3)
            row[f"ms_p95_{threads}t"] = round(1000 * float(np.percentile(t, 95)), 3)
        r10 = [len(set(ids_all[i, :10]) & set(gt[i, :10])) / 10 for i in range(len(Q))]
        row["recall@10"] = round(float(np.mean(r10)), 4)
        row["recall@10_real_q"] = round(float(np.mean(r10[:NQ_REAL])), 4)
        row["recall@10_view_q"] = round(float(np.mean(r10[NQ_REAL:])), 4)
        if flat or shortlist >= GT_K:
            row["recall@100"] = round(float(np.mean([len(set(ids_all[i]) & set(gt[i])) / GT_K
                                                     for i in range(len(Q))])), 4)
        out["runs"].append(row)
        log(f"{factory} @ {n}: {row}")
    r2 = rss()
    out["rss_after_search"] = r2
    out["resident_bytes_after_search"] = r2["VmRSS"] - r0["VmRSS"]
    out["resident_anon_bytes_after_search"] = r2["RssAnon"] - r0["RssAnon"]
    return out


def markdown(res: dict) -> str:
    lines = ["# ANN at scale (benchmarks/ann_scale.py)", "",
             f"Machine: {res['machine']}. Data: {res['data_note']}", "",
             ("Searches re-rank the shortlist exactly from the stored vectors (the memmap, read row by row) and look "
             "at the HNSW coarse quantizer with efSearch = 2 x nprobe (glimr.index.ann.search); the first runs, "
             "with FAISS's default efSearch 16, are kept in ann_scale_quantizer_ef16.md. A structure is trained "
             "once, on a sample of the 1M set (train s), and the 10M build reuses that training (build s = train s "
             "+ adding 10M). ms/q first pass: the first time each setting runs (rows of its shortlists not read "
             "before come from disk unless cached); 1t / 2t: the same queries again, 1 and 2 FAISS threads. "
             "RSS after search includes the pages of the vectors file read for re-ranking; anon MB is the search "
             "structure itself."), "",
             ("| n | structure | build s (train s) | file B/vector | RSS after load MB | RSS after search MB "
             "(anon MB) | nprobe | shortlist | ms/q first pass | ms/q 1t | ms/q 2t | p95 ms 2t | R@10 (real q / view q) "
             "| R@100 |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        ev, m = r.get("eval"), r["build"]
        if not ev:
            continue
        for run in ev["runs"]:
            lines.append(
                f"| {r['n']:,} | `{r['factory']}` | {m['build_s']} ({m['train_s']}) | {m['bytes_per_vector']} | "
                f"{ev['resident_bytes_after_load'] / 2**20:.1f} | {ev['resident_bytes_after_search'] / 2**20:.1f} "
                f"({ev['resident_anon_bytes_after_search'] / 2**20:.1f}) | {run['nprobe']} | {run['shortlist']} | "
                f"{run.get('ms_per_query_first_pass', '')} | "
                f"{run['ms_per_query_1t']} | {run['ms_per_query_2t']} | {run['ms_p95_2t']} | {run['recall@10']} ({run['recall@10_real_q']} / {run['recall@10_view_q']}) | "
                f"{run.get('recall@100', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/ann-data")
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--factories", default=None, help="';'-separated per size, e.g. 'Flat|IVF4096_HNSW32,PQ64x4fs'")
    ap.add_argument("--sweep", default="16:100,32:100,32:300,64:300,64:1000,128:1000")
    ap.add_argument("--eval-one", nargs=2, metavar=("N", "FACTORY"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ann_scale"))
    a = ap.parse_args()
    data = Path(a.data)
    data.mkdir(parents=True, exist_ok=True)
    sweep = [tuple(int(v) for v in s.split(":")) for s in a.sweep.split(",")]
    if a.eval_one:
        print(json.dumps(eval_one(data, int(a.eval_one[0]), a.eval_one[1], sweep)))
        return 0
    sizes = [int(s) for s in a.sizes.split(",")]
    rm = real_model(data)
    log(f"real: {len(rm['Y'])} descriptors, PCA 512 keeps {float(rm['explained']):.3f} of the variance; "
        f"t_inst {float(rm['t_inst']):.3f} t_view {float(rm['t_view']):.3f}")
    gen = generate(data, max(sizes), rm)
    Q = queries(data, rm)
    from glimr.index import ann

    default_f = {n: (["Flat"] if n <= 1_000_000 else []) + [
        ann.auto_factory(n, DIM), f"IVF{ann.auto_nlist(n)}_HNSW32,PQ{DIM // 8}x4fs"] for n in sizes}
    if a.factories is not None:
        for n, fs in zip(sizes, a.factories.split(";")):
            default_f[n] = [f for f in fs.split("|") if f]
    res_p = Path(a.out + ".json")
    res = json.loads(res_p.read_text()) if res_p.exists() else {"results": []}
    res["machine"] = f"{os.cpu_count()} CPU cores (shared with other jobs), " \
                     f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, " \
                     f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    res["data_note"] = (f"{len(rm['Y'])} real gem-lite0 descriptors (PCA 1280->512 keeps "
                        f"{float(rm['explained']):.3f} of the variance) extended by a hierarchical Gaussian mixture "
                        f"(h1={gen['h1']:.3f}: median cos centre-seed = {float(rm['t_inst']):.3f}, as two photos of one webcam "
                        f"scene; h2={gen['h2']:.3f}: median cos image-centre = {float(rm['t_view']):.3f}, as two "
                        "consecutive lund street photos); "
                        f"{len(Q)} queries (100 held-out real photos, 100 new views of indexed instances)")
    res["generator"] = {k: gen[k] for k in ("h1", "h2")} | {"t_inst": float(rm["t_inst"]),
                                                           "t_view": float(rm["t_view"])}
    done = {(r["n"], r["factory"]) for r in res["results"] if r.get("eval")}
    for n in sizes:
        ground_truth(data, n, Q)
        res.setdefault("ground_truth_s", {})[str(n)] = json.loads((data / f"gt_{n}.json").read_text())["seconds"]
        for f in default_f[n]:
            if (n, f) in done:
                continue
            m = build_one(data, n, f)
            cmd = [sys.executable, __file__, "--data", str(data), "--sweep", a.sweep, "--eval-one", str(n), f]
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            ev = json.loads(p.stdout)
            res["results"] = [r for r in res["results"] if (r["n"], r["factory"]) != (n, f)]
            res["results"].append({"n": n, "factory": f, "build": m, "eval": ev})
            Path(a.out + ".json").write_text(json.dumps(res, indent=1))
            Path(a.out + ".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
