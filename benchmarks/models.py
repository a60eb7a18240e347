"""Cost of every head on every backbone: parameters, GFLOPs, ms per image (fp32 and bf16 autocast) and
descriptor size; the time each head adds to the GeM baseline on the same backbone and input size.
Goal: no head adds more than 25% to GeM's time.

Prints the rows as JSON, then a markdown table in the manner of UGALR's Table 2 (extraction latency and
descriptor memory).

    python benchmarks/models.py                                   # all heads, resnet50 + lite0, 512 and 1024
    python benchmarks/models.py --heads gem,glam --backbones lite0 --sizes 512 --device cuda --batch 8
    python benchmarks/models.py --heads gem,dplg --backbones lite0 --sizes 128 --repeats 2 --warmup 1  # smoke

Models run with random weights (`weights="none"`: speed does not depend on them) on square inputs of
`size` x `size`. FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one image, on the meta
device (matmuls and convolutions; 1 multiply-add = 2 FLOPs). Times are medians over `--repeats` timed runs after `--warmup`
runs, divided by the batch size; on CUDA with synchronisation.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glimr.models.registry import build_model  # noqa: E402

HEADS = ["gem", "glam", "cider", "ugalr", "dplg", "dolg"]
BACKBONES = ["resnet50", "lite0"]
GOAL = 0.25


def count_gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """GFLOPs of model on one image of x's size, counted on a copy on the meta device (no computation)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        meta(torch.empty((1, *x.shape[1:]), device="meta"))
    return fc.get_total_flops() / 1e9


def time_ms(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, warmup: int,
            repeats: int) -> float:
    """Median milliseconds per image of model(x), under autocast(dtype) when dtype is given."""
    dev = x.device.type
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        t = time.perf_counter()
        amp = torch.autocast(dev, dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.inference_mode(), amp:
            model(x)
        sync()
        return time.perf_counter() - t

    for _ in range(warmup):
        once()
    return 1000 * statistics.median(once() for _ in range(repeats)) / x.shape[0]


def bench_one(head: str, backbone: str, size: int, device: str, batch: int, warmup: int, repeats: int,
              bf16: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(f"{head}-{backbone}", weights="none").eval().to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    n_all = sum(p.numel() for p in model.parameters())
    n_head = sum(p.numel() for p in model.head.parameters())
    row = {
        "model": f"{head}-{backbone}", "head": head, "backbone": backbone, "size": size, "device": device,
        "batch": batch, "params_m": n_all / 1e6, "head_params_m": n_head / 1e6,
        "gflops": count_gflops(model, x), "dim": model.dim, "descriptor_bytes": model.dim * 4,
        "gib_per_1m_images": model.dim * 4 * 1e6 / 2**30,
        "ms_fp32": time_ms(model, x, None, warmup, repeats),
        "ms_bf16": time_ms(model, x, torch.bfloat16, warmup, repeats) if bf16 else None,
    }
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def add_overheads(rows: list[dict]) -> None:
    """Time, GFLOPs and parameters relative to GeM on the same backbone and size."""
    base = {(r["backbone"], r["size"]): r for r in rows if r["head"] == "gem"}
    for r in rows:
        b = base.get((r["backbone"], r["size"]))
        for key in ("ms_fp32", "ms_bf16", "gflops"):
            r[f"{key}_vs_gem"] = (r[key] / b[key] - 1.0) if b and r[key] is not None and b[key] else None
        t = r["ms_fp32_vs_gem"]
        r["meets_goal"] = None if t is None else t <= GOAL and (r["ms_bf16_vs_gem"] is None or
                                                                 r["ms_bf16_vs_gem"] <= GOAL)


def pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:+.0f}%"


def num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown(rows: list[dict]) -> str:
    head = ("| model | input | params (M) | head params (M) | GFLOPs | ms/img fp32 | ms/img bf16 | "
            "time vs GeM fp32 / bf16 | descriptor (bytes) | memory 1M images (GiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        flag = "" if r["meets_goal"] in (None, True) else " (over 25%)"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['params_m']:.1f} | {r['head_params_m']:.2f} "
            f"| {r['gflops']:.1f} "
            f"| {num(r['ms_fp32'], '.1f')} | {num(r['ms_bf16'], '.1f')} "
            f"| {pct(r['ms_fp32_vs_gem'])} / {pct(r['ms_bf16_vs_gem'])}{flag} "
            f"| {r['descriptor_bytes']} | {r['gib_per_1m_images']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default=",".join(HEADS),
                    help="comma-separated heads (gem is always added: the baseline)")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--sizes", default="512,1024", help="square input sizes")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast timings")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        from glimr.models.cpu import tune_allocator

        tune_allocator()                     # as glimr's extraction does (glimr/models/cpu.py): every head gets it
    heads = [h for h in args.heads.split(",") if h]
    heads = ["gem"] + [h for h in heads if h != "gem"]
    rows = []
    combos = [(b, int(s), h) for b in args.backbones.split(",") for s in args.sizes.split(",") for h in heads]
    for i, (b, s, h) in enumerate(combos, 1):
        print(f"[{i}/{len(combos)}] {h}-{b} @ {s} on {device}", file=sys.stderr, flush=True)
        rows.append(bench_one(h, b, s, device, args.batch, args.warmup, args.repeats, not args.no_bf16))
    add_overheads(rows)
    text = json.dumps(rows, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\nDevice: {gpu}, batch {args.batch}, median of {args.repeats} runs. Goal: +25% at most vs GeM.\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
