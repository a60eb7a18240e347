"""Load on `glimr serve`: concurrent searching clients while another client adds images, then a check that the
served index equals a fresh build of the same files. Localhost only; bounded in time and requests.

1. Index IMAGES (default ../shared/data/ukbench, longest side --max-size) into WORK/index with `glimr index build`.
2. Start `python -m glimr serve WORK/index --token-file ...` on a free 127.0.0.1 port.
3. --clients async clients (httpx) each search in a loop (a random IMAGES photo, top 10) for --duration seconds,
   at most --max-requests in all, while one more client adds --adds photos of ../shared/data/photos
   (POST /api/images, spread over the run).
4. Report requests/s, p50/p90/p99 latency, errors (any answer but 200/201, any transport error), the adds'
   latencies, and the server's /metrics histogram count.
5. Stop the server; copy IMAGES plus the added photos into WORK/fresh and build a fresh index of them with the
   same settings; the served index must hold the same rows (same content hashes, all searchable) and, per
   image, a vector with cosine > 0.9999 to the fresh one.

    python benchmarks/serve_load.py                               # 50 clients, 60 s, 20 adds
    python benchmarks/serve_load.py --clients 8 --duration 10 --adds 3 --out /tmp/serve_load_quick

Writes OUT.json and OUT.md (default benchmarks/results/serve_load).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = (ROOT / ".." / "shared" / "data").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def glimr(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "glimr", *args], check=True, cwd=ROOT, env=env)


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def run_load(url: str, token: str, queries: list[bytes], adds: list[Path], clients: int, duration: float,
                   max_requests: int) -> dict:
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    add_lat: list[float] = []
    added: list[dict] = []
    sent = 0
    t_end = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def searcher(seed: int):
            nonlocal sent
            rng = random.Random(seed)
            while time.perf_counter() < t_end and sent < max_requests:
                sent += 1
                data = queries[rng.randrange(len(queries))]
                t0 = time.perf_counter()
                try:
                    r = await http.post("/api/search", files={"image": ("q.jpg", data, "image/jpeg")},
                                        data={"top": "10"})
                    if r.status_code != 200:
                        errors.append(f"search {r.status_code}: {r.text[:200]}")
                    else:
                        lat.append(time.perf_counter() - t0)
                except httpx.HTTPError as e:
                    errors.append(f"search {type(e).__name__}: {e}")

        async def adder():
            start = time.perf_counter()
            for k, p in enumerate(adds, 1):   # at k/(n+1) of the run (at once when the previous add ran late)
                await asyncio.sleep(max(0.0, start + k * duration / (len(adds) + 1) - time.perf_counter()))
                t0 = time.perf_counter()
                try:
                    r = await http.post("/api/images", files={"image": (p.name, p.read_bytes(), "image/jpeg")},
                                        headers={"Authorization": f"Bearer {token}"})
                    if r.status_code != 201:
                        errors.append(f"add {p.name} {r.status_code}: {r.text[:200]}")
                    else:
                        add_lat.append(time.perf_counter() - t0)
                        added.append({**r.json(), "source": str(p)})
                except httpx.HTTPError as e:
                    errors.append(f"add {type(e).__name__}: {e}")

        t0 = time.perf_counter()
        searched = asyncio.gather(*(searcher(i) for i in range(clients)))
        adding = asyncio.ensure_future(adder())
        await searched
        wall = time.perf_counter() - t0            # the searching window, until the last answer came
        await adding
        metrics = (await http.get("/metrics")).text
        stats = (await http.get("/api/stats")).json()
    count = next((float(ln.split()[-1]) for ln in metrics.splitlines()
                  if ln.startswith('glimr_http_request_duration_seconds_count{route="/api/search"}')), 0.0)
    return {"wall_s": round(wall, 2), "searches_ok": len(lat), "requests_sent": sent, "errors": len(errors),
            "error_samples": errors[:10], "requests_per_s": round(len(lat) / wall, 2),
            "latency_ms": {k: round(percentile(lat, q) * 1000, 1) for k, q in
                           (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
            "adds_ok": len(add_lat), "add_latency_ms": {k: round(percentile(add_lat, q) * 1000, 1)
                                                        for k, q in (("p50", 50), ("max", 100))},
            "server_search_count": count, "images_after": stats["images"], "added": added}


def compare(served: Path, fresh: Path) -> dict:
    from glimr.index.store import IndexStore

    def by_hash(d: Path):
        with IndexStore.open(d, quiet=True) as s:
            rows = [r for r in s.rows().values() if r.status == "ok"]
            vecs = np.asarray(s.vectors())
            return {r.hash: vecs[r.vid] for r in rows}, len(rows), s.stats()["errors"]

    a, na, ea = by_hash(served)
    b, nb, eb = by_hash(fresh)
    same = set(a) == set(b)
    cos = [float(a[h] @ b[h] / (np.linalg.norm(a[h]) * np.linalg.norm(b[h]))) for h in set(a) & set(b)]
    return {"served_rows": na, "fresh_rows": nb, "served_errors": ea, "fresh_errors": eb, "same_rows": same,
            "min_cosine": round(min(cos), 7) if cos else None, "equal": bool(same and na == nb and cos
                                                                            and min(cos) > 0.9999)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(SHARED / "ukbench"), help="folder to index and draw queries from")
    ap.add_argument("--photos", default=str(SHARED / "photos"), help="folder of photos to add during the load")
    ap.add_argument("--max-size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of searching")
    ap.add_argument("--max-requests", type=int, default=20000, help="searches in all, at most")
    ap.add_argument("--adds", type=int, default=20, help="photos added during the run")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load"))
    args = ap.parse_args()
    if not 1 <= args.clients <= 1000 or not 0 < args.duration <= 3600 or not 0 <= args.adds <= 1000:
        ap.error("--clients 1..1000, --duration 0..3600 s, --adds 0..1000")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="glimr-serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    images, index, fresh = Path(args.images), work / "index", work / "fresh"
    print(f"index {images} -> {index}", file=sys.stderr)
    glimr("index", "build", str(images), "--index", str(index), "--max-size", str(args.max_size))
    token = "load-" + os.urandom(12).hex()
    (work / "token").write_text(token)
    (work / "token").chmod(0o600)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "wb")  # noqa: SIM115
    srv = subprocess.Popen([sys.executable, "-m", "glimr", "serve", str(index), "--port", str(port),
                            "--token-file", str(work / "token"), "--log-level", "warning"],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=log)
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if srv.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {(work / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        from glimr.io.images import list_images

        queries = [p.read_bytes() for p in list_images(images)]
        adds = sorted(Path(args.photos).glob("*.JPEG"))[:args.adds]
        print(f"{args.clients} clients searching for {args.duration:g} s, {len(adds)} adds", file=sys.stderr)
        load = asyncio.run(run_load(url, token, queries, adds, args.clients, args.duration, args.max_requests))
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()
        log.close()
    # a fresh build of the same files
    shutil.copytree(images, fresh)
    for a in load["added"]:
        shutil.copy(a["source"], fresh / ("added-" + Path(a["source"]).name))
    glimr("index", "build", str(fresh), "--index", str(work / "fresh-index"), "--max-size", str(args.max_size))
    check = compare(index, work / "fresh-index")
    result = {"benchmark": "serve_load", "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m":
                          round(os.getloadavg()[0], 2)},
              "settings": {"images": str(images), "n_images": len(queries), "max_size": args.max_size,
                           "clients": args.clients, "duration_s": args.duration, "adds": len(adds),
                           "model": "index default", "concurrency": 1},
              **{k: v for k, v in load.items() if k != "added"}, "fresh_build_check": check}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency_ms"]
    md = [f"# glimr serve under load ({result['date']})", "",
          (f"{args.clients} concurrent clients searching (POST /api/search, top 10, a random photo of "
          f"`{images.name}`, {len(queries)} images indexed at longest side {args.max_size}) for "
          f"{args.duration:g} s while one more client added {len(adds)} photos (POST /api/images). One server "
          f"process, one model forward pass at a time; {os.cpu_count()} CPUs, 1-minute load average at the end "
          f"{result['machine']['load_avg_1m']} (a shared machine)."), "",
          "| searches | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors | adds | add p50 ms |",
          "|---|---|---|---|---|---|---|---|---|",
          (f"| {result['searches_ok']} | {result['requests_per_s']} | {lat['p50']} | {lat['p90']} | {lat['p99']} | "
          f"{lat['max']} | {result['errors']} | {result['adds_ok']}/{len(adds)} | {result['add_latency_ms']['p50']} |"),
          "", (f"Index afterwards against a fresh build of the same {check['fresh_rows']} files: same rows "
          f"{check['same_rows']} ({check['served_rows']} served, {check['fresh_rows']} fresh), minimum cosine "
          f"{check['min_cosine']}: **{'equal' if check['equal'] else 'NOT equal'}**."), "",
          (f"Reproduce: `python benchmarks/serve_load.py --clients {args.clients} --duration {args.duration:g} "
          f"--adds {args.adds}`")]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["errors"] == 0 and check["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
