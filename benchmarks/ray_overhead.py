"""Extraction throughput of an index build on Ray against the local pipeline, on this machine: the engine's
overhead in percent.

    python benchmarks/ray_overhead.py --out benchmarks/results/ray_overhead
    python benchmarks/ray_overhead.py --model gem-lite0 --max-size 512 --rounds 2 --images 300

Images: UKBench's 300 real photos (640x480, ../shared/data/ukbench). Each round builds three fresh indexes of
them, one after the other, with the same model, settings (fp32, one scale, chunks of 256) and the same
durable commits:

- local: `glimr index build` in this process (torch's 2 threads, decoding in a background thread);
- ray 2x1: `--ray` with no address, so the build starts a local Ray (all of this machine's CPUs), with two
  actors of 1 CPU (1 torch thread each), tasks of 32 files;
- ray 1x2: the same with one actor of 2 CPUs (`--ray-cpus 2`: the local pipeline's layout, inside an actor).

Times (wall clock, the model already loaded in this process): `total` from the call to its return (for Ray:
starting Ray, starting the actors, which load the model, embedding, committing, stopping Ray); `embed` for Ray
from the moment every actor had loaded its model to the end of the build (the steady state: what a long build
pays per image; it still includes each actor's first-call costs, e.g. making its folded copy of the net, which
the local side paid before its timing, on 8 photos). Overhead = time / local time - 1. The machine is shared with other jobs: each round records
the load average, and the rounds are interleaved so that both sides see the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from glimr.index.build import build_index, make_settings, run_build
from glimr.index.ray import RayEmbedder, RaySettings
from glimr.models.registry import build_model

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def run_local(images: Path, out: Path, model, settings, index_settings) -> dict:
    t0 = time.perf_counter()
    rep = build_index(images, out, model, settings=settings, index_settings=index_settings, progress=False)
    t = time.perf_counter() - t0
    return {"total_s": t, "embed_s": t, "added": rep.added}


def run_ray(images: Path, out: Path, model, settings, index_settings, cpus: float) -> dict:
    emb = RayEmbedder(model, settings, RaySettings(cpus=cpus))
    t0 = time.perf_counter()
    m0 = time.monotonic()
    try:
        emb.connect()
        t_connect = time.monotonic() - m0
        rep = run_build(images, out, settings, index_settings, embed=emb, progress=False)
        t_end = time.monotonic()
    finally:
        emb.close()
    total = time.perf_counter() - t0
    return {"total_s": total, "connect_s": t_connect, "actors_ready_s": emb.ready_at - m0,
            "embed_s": t_end - emb.ready_at, "actors": len(emb.infos), "added": rep.added,
            "retried": emb.retried}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gem-lite0")
    ap.add_argument("--max-size", type=int, default=512)
    ap.add_argument("--images", type=int, default=300, help="first N UKBench photos")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    # the local Ray this starts authenticates with a token of its own, passed by environment, so that Ray does not
    # write one into ~/.ray/auth_token (where it would change how later `ray start` clusters of this user behave)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

    src = sorted((DATA / "ukbench").glob("*.jpg"))[: args.images]
    work = Path(tempfile.mkdtemp(prefix="glimr-rayb-", dir="/tmp"))  # short: Ray's unix sockets live there
    os.environ.setdefault("RAY_TMPDIR", str(work))  # the local Ray's session files go with the work folder
    images = work / "images"
    images.mkdir()
    for p in src:
        shutil.copy(p, images / p.name)
    model = build_model(args.model)
    settings, index_settings = make_settings(model, model_name=args.model, max_size=args.max_size,
                                             precision="fp32", workers=None)
    from glimr.extract.multiscale import extract

    extract(model, src[:8], settings=settings, progress=False)  # the local side's one-time costs (folded copy)
    runs = []
    try:
        for r in range(args.rounds):
            for name, fn in (("local", lambda o: run_local(images, o, model, settings, index_settings)),
                             ("ray 2x1", lambda o: run_ray(images, o, model, settings, index_settings, 1.0)),
                             ("ray 1x2", lambda o: run_ray(images, o, model, settings, index_settings, 2.0))):
                out = work / f"idx-{r}-{name.replace(' ', '')}"
                load = os.getloadavg()[0]
                res = {"round": r + 1, "mode": name, "load_before": round(load, 2), **fn(out)}
                res["load_after"] = round(os.getloadavg()[0], 2)
                res["images_per_s_total"] = res["added"] / res["total_s"]
                res["images_per_s_embed"] = res["added"] / res["embed_s"]
                runs.append(res)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}),
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for res in runs:
        base = next(x for x in runs if x["round"] == res["round"] and x["mode"] == "local")
        res["overhead_total_pct"] = 100 * (res["total_s"] / base["total_s"] - 1)
        res["overhead_embed_pct"] = 100 * (res["embed_s"] / base["total_s"] - 1)
    result = {"benchmark": "ray_overhead", "model": args.model, "max_size": args.max_size, "precision": "fp32",
              "images": len(src), "chunk_size": index_settings.chunk_size, "task_size": RaySettings().task_size,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "torch": torch.__version__, "ray": __import__("ray").__version__, "runs": runs}
    md = render(result)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)
    return 0


def render(result: dict) -> str:
    lines = [(f"# Index build on Ray vs local: {result['model']}, {result['images']} UKBench photos at "
             f"{result['max_size']} px, {result['precision']}"), "",
             ("| round | mode | load avg | total s | img/s (total) | overhead (total) | actors ready s | "
             "embed s | img/s (embed) | overhead (embed) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        ray = r["mode"] != "local"
        o_total = f"{r['overhead_total_pct']:+.0f}%" if ray else "-"
        o_embed = f"{r['overhead_embed_pct']:+.0f}%" if ray else "-"
        ready = f"{r['actors_ready_s']:.1f}" if ray else "-"
        lines.append(f"| {r['round']} | {r['mode']} | {r['load_before']:.1f} | {r['total_s']:.1f} | "
                     f"{r['images_per_s_total']:.1f} | {o_total} | {ready} | {r['embed_s']:.1f} | "
                     f"{r['images_per_s_embed']:.1f} | {o_embed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
