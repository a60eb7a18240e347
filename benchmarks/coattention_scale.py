"""Co-attention search at scale on this CPU: milliseconds per query and bytes per image, 100k and 1M images.

Synthetic database of co-attention records (glimr.extract.local.RecordCodec: K cluster vectors of D' dims,
norms, Gram, the temperature-0 proxy, visual words) and the inverted file built from the words, then the
search of glimr.rerank.coattention.CoAttentionIndex.search, as ``glimr search --rerank coattention`` runs it:

1. inverted file (sec. 5.2): the images sharing a visual word with the query;
2. shortlist: the best ``--shortlist`` of them by the proxy (co-attention with uniform weights, proxy_dim dims);
3. exact co-attention (eqs. (8)-(10)) of the shortlist; the others get the fallback score.

Also timed: the exhaustive exact co-attention of every image the inverted file keeps (no shortlist), as in the
paper (530 ms per query on a Tesla GPU at 1M, about 20 KB per image). Planted matches (images whose clusters
contain a noisy copy of the query) check that the fast path finds what the exhaustive one finds.

    python benchmarks/coattention_scale.py                      # 100k and 1M, writes benchmarks/results/
    python benchmarks/coattention_scale.py --sizes 100000 --queries 5

Word statistics: every image gets ``--words-per-image`` distinct words drawn from a Zipf-like law
(exponent ``--zipf``) over ``--codebook`` words; the fraction of the database the inverted file keeps depends
on them and is reported.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path


def _threads_from_argv(default: str = "1") -> str:
    """--threads N, read before numpy/torch start their thread pools (default 1: one query per core; with
    other jobs on the machine, 2-thread kernels mostly wait at their barriers for a descheduled thread)."""
    argv = sys.argv
    return argv[argv.index("--threads") + 1] if "--threads" in argv[:-1] else default


if __name__ == "__main__":
    for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_v] = _threads_from_argv()

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glimr.extract.local import LocalConfig, l2n_np  # noqa: E402
from glimr.rerank.coattention import CoAttentionIndex  # noqa: E402
from glimr.rerank.invfile import InvertedFile  # noqa: E402


def synthetic_index(m: int, cfg: LocalConfig, words_per_image: int, zipf: float, n_planted: int, seed: int = 0,
                    chunk: int = 50000):
    """A synthetic CoAttentionIndex of ``m`` images, plus planted queries: returns (index, queries)."""
    rng = np.random.default_rng(seed)
    k, d = cfg.clusters, cfg.dim
    scale = np.full(d, 1.0 / 127 * 4.0 / np.sqrt(d), np.float32)    # int8 steps for unit vectors (|u_d| ~ 1/sqrt d)
    codec = cfg.codec(scale)
    codes = np.zeros((m, k, d), np.int8 if cfg.dtype == "int8" else np.float32)
    norms = np.ones((m, k), np.float32)
    gram = np.zeros((m, k * (k - 1) // 2), np.float32)
    proxy = np.zeros((m, cfg.proxy_dim), np.int8)
    pscale = np.zeros(m, np.float32)
    words = np.full((m, cfg.max_words), codec.pad_word, codec.word_dtype)
    iu = np.triu_indices(k, 1)
    p = 1.0 / np.arange(1, cfg.codebook_size + 1) ** zipf
    p /= p.sum()
    perm = rng.permutation(cfg.codebook_size)                     # frequent words spread over the ids

    def encode(u):
        return np.clip(np.rint(u / scale), -127, 127).astype(np.int8) if cfg.dtype == "int8" else u

    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        n = e - s
        u = l2n_np(rng.standard_normal((n, k, d)).astype(np.float32))
        codes[s:e] = encode(u)
        gram[s:e] = np.einsum("nkd,nld->nkl", u, u)[:, iu[0], iu[1]]
        pv = l2n_np(u.sum(1)[:, :cfg.proxy_dim])
        pscale[s:e] = np.abs(pv).max(1) / 127
        proxy[s:e] = np.rint(pv / pscale[s:e, None]).astype(np.int8)
        w = perm[rng.choice(cfg.codebook_size, size=(n, words_per_image), p=p)]
        w.sort(1)
        dup = np.zeros_like(w, dtype=bool)
        dup[:, 1:] = w[:, 1:] == w[:, :-1]
        w[dup] = codec.pad_word
        w.sort(1)
        words[s:e, :min(cfg.max_words, words_per_image)] = w[:, :cfg.max_words]
    # planted matches: image i_j holds, as one of its clusters, a noisy copy of query j; 20 of its words
    queries = []
    planted = rng.choice(m, size=n_planted, replace=False)
    for i in planted:
        q = l2n_np(rng.standard_normal(d).astype(np.float32))
        u = l2n_np(rng.standard_normal((k, d)).astype(np.float32))
        u[0] = l2n_np(q + 0.35 * l2n_np(rng.standard_normal(d).astype(np.float32)))
        codes[i] = encode(u)
        gram[i] = (u @ u.T)[iu]
        pv = l2n_np(u.sum(0)[:cfg.proxy_dim])
        pscale[i] = np.abs(pv).max() / 127
        proxy[i] = np.rint(pv / pscale[i]).astype(np.int8)
        own = words[i][words[i] != codec.pad_word][:20]
        qw = np.unique(np.concatenate([own, perm[rng.choice(cfg.codebook_size, size=130, p=p)]]))
        queries.append((q, qw, int(i)))
    t0 = time.perf_counter()
    inv = InvertedFile.from_words(words, cfg.codebook_size, codec.pad_word)
    t_inv = time.perf_counter() - t0
    idx = CoAttentionIndex(codes, norms, gram, proxy, pscale, codec, words=None, ivf=inv)
    return idx, queries, t_inv


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    r = fn(*a, **kw)
    return r, (time.perf_counter() - t0) * 1000


def run(m: int, args) -> dict:
    cfg = LocalConfig(clusters=args.clusters, dim=args.dim, dtype=args.dtype, proxy_dim=args.proxy_dim,
                      codebook_size=args.codebook, max_words=args.max_words)
    t0 = time.perf_counter()
    idx, queries, t_inv = synthetic_index(m, cfg, args.words_per_image, args.zipf, args.queries, seed=args.seed)
    build_s = time.perf_counter() - t0
    print(f"[{m}] synthetic database ready in {build_s:.0f} s (inverted file {t_inv:.1f} s)", flush=True)
    # warm-up
    idx.search(queries[0][0], queries[0][1], k=100, shortlist=args.shortlist)
    fast, found_fast, kept = [], 0, []
    for q, qw, target in queries:
        res, ms = timed(idx.search, q, qw, 100, shortlist=args.shortlist, temperature=10.0)
        fast.append(ms)
        found_fast += int(res.ids[0] == target)
        kept.append(res.n_candidates / m)
    stages = {}
    q, qw, _ = queries[0]
    for name, fn in (("inverted file", lambda: idx.candidates(qw)), ("proxy scan", lambda: idx.proxy_scores(q)),
                     ("exact co-attention of the shortlist",
                      lambda: idx.scores(q, np.arange(0, m, max(1, m // args.shortlist))[:args.shortlist]))):
        stages[name] = round(float(np.median([timed(fn)[1] for _ in range(5)])), 2)
    exh, found_exh = [], 0
    for q, qw, target in queries[:args.exhaustive_queries]:
        res, ms = timed(idx.search, q, qw, 100, shortlist=None, temperature=10.0)
        exh.append(ms)
        found_exh += int(res.ids[0] == target)
    b = idx.bytes_per_image()
    out = {"images": m, "record_bytes": b["record"], "inverted_file_bytes_per_image": b["inverted_file"],
           "bytes_per_image": b["total"],
           "ms_per_query_fast": {"median": round(float(np.median(fast)), 1), "p90": round(float(np.percentile(fast, 90)), 1),
                                 "max": round(float(np.max(fast)), 1)},
           "stages_ms_median": stages,
           "ms_per_query_exhaustive": {"median": round(float(np.median(exh)), 1), "n_queries": len(exh)},
           "ivf_kept_fraction": round(float(np.mean(kept)), 3),
           "planted_found_at_rank1": {"fast": f"{found_fast}/{len(queries)}",
                                      "exhaustive": f"{found_exh}/{len(exh)}"},
           "build_seconds": round(build_s, 1)}
    print(json.dumps(out, indent=2), flush=True)
    del idx
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--exhaustive-queries", type=int, default=3)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dtype", default="int8", choices=["float32", "float16", "int8"])
    ap.add_argument("--proxy-dim", type=int, default=64)
    ap.add_argument("--codebook", type=int, default=65535, help="visual words (<= 65535: uint16 ids)")
    ap.add_argument("--max-words", type=int, default=128)
    ap.add_argument("--words-per-image", type=int, default=100)
    ap.add_argument("--zipf", type=float, default=0.4)
    ap.add_argument("--shortlist", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for the search (numpy, torch, FAISS)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coattention_scale"))
    args = ap.parse_args(argv)
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)

    res = {"meta": {"command": "python benchmarks/coattention_scale.py " + " ".join(argv if argv is not None else
                                                                                       sys.argv[1:]),
                    "date": _dt.datetime.now().isoformat(timespec="seconds"), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(),
                    "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}},
           "runs": [run(m, args) for m in args.sizes]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Co-attention search at scale (this CPU)", "",
             f"`{res['meta']['command']}` ({res['meta']['date']}); K={args.clusters}, D'={args.dim} {args.dtype}, "
             f"proxy {args.proxy_dim} dims, codebook {args.codebook}, {args.words_per_image} words/image "
             f"(Zipf {args.zipf}), shortlist {args.shortlist}; {args.threads} thread(s) on {os.cpu_count()} CPUs, "
             f"load average at start {res['meta']['load_average_at_start'][0]:.1f} (other jobs on the machine).", "",
             "| images | bytes/image (record + inverted file) | ms/query (IVF + shortlist + exact) median / p90 "
             "| ms/query exhaustive (paper's way) | IVF keeps | planted match at rank 1 |", "|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['images']:,} | {r['bytes_per_image']:.0f} ({r['record_bytes']} + "
                     f"{r['inverted_file_bytes_per_image']:.0f}) | {r['ms_per_query_fast']['median']:.0f} / "
                     f"{r['ms_per_query_fast']['p90']:.0f} | {r['ms_per_query_exhaustive']['median']:.0f} | "
                     f"{100 * r['ivf_kept_fraction']:.0f}% | fast {r['planted_found_at_rank1']['fast']}, "
                     f"exhaustive {r['planted_found_at_rank1']['exhaustive']} |")
    lines += ["", "Paper (Table 13, sec. 7.11): 530 ms per query on a Tesla GPU at 1M, 0.02 MB (K=10 x D'=512 float32) "
                  "per image.", "", "Stage timings (median ms, first query): " +
              "; ".join(f"{m['images']:,}: " + ", ".join(f"{k} {v}" for k, v in m['stages_ms_median'].items())
                        for m in res["runs"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
