"""Extraction speed: the whole pipeline (decode in workers, resize, batch, forward, pool) against the same
model's pure forward pass on ready tensors, and the bound set by its FLOPs and this CPU's matmul peak.

    python benchmarks/extract_speed.py                      # Lite0, Lite2, ResNet-50 at 512 and 1024
    python benchmarks/extract_speed.py --models lite0 --sizes 512 --precisions fp32 --seconds 10 --rounds 5

Images: real UKBench photos (640x480) for 512, the full-resolution Oxford sample photos for 1024 (repeated),
from ../shared/data. Weights are random for ResNet (speed does not depend on them). Prints JSON lines and a
markdown table; a bf16 row on a CPU without native bf16 is measured on few images and marked as such.

The pure forward rate is measured on the same decoded, resized images the pipeline sees, ready as float
tensors, for every input shape (the Oxford photos are landscape and portrait, so at 1024 there are several),
each weighted by its share of the images: the pipeline and the forward pass then do the same arithmetic on the
same data, and pipe/fwd measures only what decoding, resizing, batching and pooling cost. Both run with glimr's
CPU allocator setting (glimr/models/cpu.py) and glimr's default decoding workers for this machine, and both
run the net extract() runs: its inference copy with the BatchNorms folded (glimr/models/fold.py;
GLIMR_FOLD_BN=0 measures without).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from glimr.extract.multiscale import extract
from glimr.models.fold import inference_model
from glimr.models.precision import autocast, cpu_has_native_bf16
from glimr.models.registry import build_model

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def images_for(size: int) -> list[Path]:
    if size <= 640:
        return sorted((DATA / "ukbench").glob("*.jpg"))
    return sorted((DATA / "revisited" / "oxford-sample").glob("*.jpg"))


def input_shapes(paths: list[Path], size: int) -> dict[tuple[int, int], int]:
    """{(H, W) the model sees: number of images} (the resize of glimr.extract.multiscale)."""
    from collections import Counter

    from PIL import Image

    from glimr.extract.multiscale import resized_views

    shapes: Counter = Counter()
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
        v = resized_views(Image.new("RGB", (w, h)), (1.0,), size)[0]
        shapes[(int(v.shape[1]), int(v.shape[2]))] += 1
    return dict(shapes)


def ready_batches(paths: list[Path], size: int, batch: int) -> dict[tuple[int, int], tuple[torch.Tensor, int]]:
    """{shape: (a batch of the decoded, resized images of that shape (cycled to fill it), float, channels-last,
    as extract() feeds the model; number of images of that shape)}."""
    from glimr.extract.multiscale import ImageViews

    ds = ImageViews(paths, (1.0,), size)
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for i in range(len(ds)):
        v = ds[i][1][0]
        groups.setdefault((int(v.shape[1]), int(v.shape[2])), []).append(v)
    out = {}
    for shape, views in groups.items():
        x = torch.stack(list(itertools.islice(itertools.cycle(views), batch))).float().div_(255.0)
        out[shape] = (x.contiguous(memory_format=torch.channels_last), len(views))
    return out


def forward_rate(model, x: torch.Tensor, precision: str, seconds: float) -> float:
    batch = x.shape[0]
    with torch.inference_mode(), autocast(precision):
        model(x)                    # warm-up at the timed shape and batch (oneDNN builds its kernels per shape)
        n, t0 = 0, time.perf_counter()
        while True:
            model(x)
            n += batch
            if time.perf_counter() - t0 >= seconds and n >= 2 * batch:
                break
    return n / (time.perf_counter() - t0)


def mixed_forward_rate(model, batches: dict, precision: str, seconds: float) -> float:
    """Images/s of the forward pass alone over the pipeline's mix of shapes: 1 / sum_s share_s / rate_s, each
    shape timed on the same decoded images the pipeline sees (no decoding, resizing or batching in the loop)."""
    total = sum(c for _, c in batches.values())
    per_image = 0.0
    for x, count in batches.values():
        per_image += count / total / forward_rate(model, x, precision, seconds * count / total)
    return 1.0 / per_image


def flops_per_image(model, shapes: dict) -> float:
    total = sum(shapes.values())
    flops = 0.0
    for shape, count in shapes.items():
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            model(torch.rand(1, 3, *shape))
        flops += fc.get_total_flops() * count / total
    return flops


def pipeline_rate(model, paths, size, batch, workers, precision, n_images):
    items = list(itertools.islice(itertools.cycle(paths), n_images))
    extract(model, items[:batch], max_size=size, batch_size=batch, workers=0, precision=precision, progress=False)
    t0 = time.perf_counter()
    res = extract(model, items, max_size=size, batch_size=batch, workers=workers, precision=precision,
                  progress=False)
    assert not res.errors
    return n_images / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lite0,lite2,resnet50")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per forward pass (default 8 up to 640 pixels, 2 above: measured fastest here)")
    ap.add_argument("--workers", type=int, default=None,
                    help="decoding processes (default: glimr's, 0 on a 2-core machine: glimr/models/cpu.py)")
    ap.add_argument("--seconds", type=float, default=6.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating forward/pipeline measurements; the medians are reported (default 3)")
    ap.add_argument("--out", default=None, help="also write the JSON rows here")
    a = ap.parse_args(argv)
    from glimr.models.cpu import resolve_workers, tune_allocator

    allocator_tuned = tune_allocator()          # what glimr's extraction does on a CPU: both rates get it
    a.workers = resolve_workers(a.workers)
    native_bf16 = cpu_has_native_bf16()
    peaks = {"fp32": matmul_peak(torch.float32)}
    if "bf16" in a.precisions:
        peaks["bf16"] = matmul_peak(torch.bfloat16, n=512 if not native_bf16 else 2048)
    print(json.dumps({"threads": torch.get_num_threads(), "native_bf16": native_bf16,
                      "allocator_tuned": allocator_tuned, "workers": a.workers,
                      "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}}), flush=True)
    rows = []
    for bb, size, prec in itertools.product(a.models.split(","), map(int, a.sizes.split(",")),
                                            a.precisions.split(",")):
        model = build_model(f"gem-{bb}", weights="none" if bb.startswith("resnet") else "pretrained").eval()
        paths = images_for(size)
        shapes = input_shapes(paths, size)
        flops = flops_per_image(model, shapes)
        slow = prec == "bf16" and not native_bf16
        secs = a.seconds if not slow else 1.0
        batch = 1 if slow else a.batch_size or (8 if size <= 640 else 2)
        ready = ready_batches(paths, size, batch)
        # rounds alternate forward and pipeline, so that a drift of the machine's speed hits both alike
        fwds, pipes = [], []
        for _ in range(1 if slow else a.rounds):
            fwds.append(mixed_forward_rate(inference_model(model), ready, prec, secs))
            n_pipe = max(batch, int(round(fwds[-1] * secs / batch)) * batch)
            pipes.append(pipeline_rate(model, paths, size, batch, a.workers, prec, n_pipe))
        fwd, pipe = statistics.median(fwds), statistics.median(pipes)
        bound = peaks[prec] / flops
        row = {"model": f"gem-{bb}", "max_size": size,
               "inputs": {f"{w}x{h}": c for (h, w), c in sorted(shapes.items())}, "precision": prec,
               "gflops_per_image": round(flops / 1e9, 2), "pipeline_img_s": round(pipe, 2),
               "forward_img_s": round(fwd, 2), "pipeline_vs_forward": round(pipe / fwd, 3),
               "flops_bound_img_s": round(bound, 2), "forward_vs_bound": round(fwd / bound, 3),
               "forward_rounds": [round(x, 2) for x in fwds], "pipeline_rounds": [round(x, 2) for x in pipes],
               "batch": batch, "workers": a.workers, "note": "no native bf16 on this CPU" if slow else ""}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | size | inputs (WxH: images) | prec | GFLOPs/img | pipeline img/s | forward img/s | pipe/fwd | "
          "FLOP bound img/s | fwd/bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['max_size']} | {', '.join(f'{k}: {v}' for k, v in r['inputs'].items())} | "
              f"{r['precision']} | "
              f"{r['gflops_per_image']} | {r['pipeline_img_s']} | {r['forward_img_s']} | "
              f"{r['pipeline_vs_forward']:.0%} | {r['flops_bound_img_s']} | {r['forward_vs_bound']:.0%} |"
              + (f" {r['note']}" if r["note"] else ""))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
