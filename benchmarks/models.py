"""Cost of every head on every backbone: parameters, GFLOPs, ms per image (fp32 and bf16 autocast) and
descriptor size; the time each head adds to the GeM baseline on the same backbone and input size.
Goal: no head adds more than 25% to GeM's time.

Prints the rows as JSON, then a markdown table in the manner of UGALR's Table 2 (extraction latency and
descriptor memory).

    python benchmarks/models.py                                   # all heads, resnet50 + lite0, 512 and 1024
    python benchmarks/models.py --heads gem,glam --backbones lite0 --sizes 512 --device cuda --batch 8
    python benchmarks/models.py --heads gem,dplg --backbones lite0 --sizes 128 --repeats 2 --warmup 1  # smoke
    python benchmarks/models.py --heads "dolg,dolg[atrous_dim=128]" --backbones resnet50 --sizes 512  # head arguments

A head may carry constructor arguments in brackets, `NAME[key=value;key=value]` (values are read as JSON,
else as strings); such a row is labelled with them.

Models run with random weights (`weights="none"`: speed does not depend on them) on square inputs of
`size` x `size`, in channels-last layout as `glimr extract` feeds them, and timed as `glimr extract` runs
them: the inference copy with the BatchNorms folded into their convolutions (glimr/models/fold.py;
GLIMR_FOLD_BN=0 times the nets as built). FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one image, on the meta
device (matmuls and convolutions; 1 multiply-add = 2 FLOPs). Times are per image (divided by the batch size), over `--repeats`
timed runs after `--warmup` runs; on CUDA with synchronisation. The heads of one backbone and size take turns
(one run each per round), so that drifts of the machine's speed fall on all of them alike. Each row has the
median and the fastest run; the time a head adds to GeM is taken from the fastest runs, because on a shared
machine (this one: single runs of one model vary by up to 35%) interference only ever adds time, so the
fastest run is the best estimate of a model's own cost (the reasoning of Python's timeit). The medians'
ratios are kept in the JSON rows too (`ms_fp32_median_vs_gem`).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glimr.models.fold import inference_model  # noqa: E402
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


def run_once(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Seconds of one model(x), under autocast(dtype) when dtype is given (synchronised on CUDA)."""
    dev = x.device.type
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    amp = torch.autocast(dev, dtype=dtype or torch.float32, enabled=dtype is not None)
    with torch.inference_mode(), amp:
        model(x)
    sync()
    return time.perf_counter() - t


def time_interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, dtype: torch.dtype | None,
                     warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, fastest) milliseconds per image of every model on x. The models take turns, one run each per round, so
    that a drift of the machine's speed (seen here: +-10% over minutes) falls on all of them alike."""
    for _ in range(warmup):
        for m in models.values():
            run_once(m, x, dtype)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            runs[name].append(run_once(m, x, dtype))
    return {name: (1000 * statistics.median(v) / x.shape[0], 1000 * min(v) / x.shape[0])
            for name, v in runs.items()}


def parse_heads(text: str) -> list[tuple[str, str, dict]]:
    """'gem,dolg[atrous_dim=128;p=3]' -> [(label, head, kwargs)], GeM (no arguments) first."""
    out = []
    for item in re.split(r",(?![^\[]*\])", text):
        m = re.fullmatch(r"\s*([a-z0-9_]+)\s*(?:\[(.*)\])?\s*", item)
        if not m:
            raise SystemExit(f"--heads: cannot read {item!r}; write NAME or NAME[key=value;key=value]")
        kwargs = {}
        for kv in filter(None, (m.group(2) or "").split(";")):
            key, sep, value = kv.partition("=")
            if not sep:
                raise SystemExit(f"--heads: {kv!r} in {item!r} is not key=value")
            try:
                kwargs[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                kwargs[key.strip()] = value.strip()
        out.append((item.strip(), m.group(1), kwargs))
    return [("gem", "gem", {})] + [h for h in out if h[0] != "gem"]


def bench_group(heads: list[tuple[str, str, dict]], backbone: str, size: int, device: str, batch: int,
                warmup: int, repeats: int, bf16: bool) -> list[dict]:
    """Rows of every (label, head, kwargs) on one backbone and input size, timed in alternation."""
    models, rows = {}, []
    for label, head, kwargs in heads:
        torch.manual_seed(0)
        model = build_model(f"{head}-{backbone}", weights="none", **kwargs).eval().to(device)
        x = torch.rand(batch, 3, size, size, device=device)
        n_all = sum(p.numel() for p in model.parameters())
        n_head = sum(p.numel() for p in model.head.parameters())
        name = f"{head}-{backbone}" + (label[len(head):] if kwargs else "")
        rows.append({
            "model": name, "label": label, "head": head, "head_kwargs": kwargs, "backbone": backbone,
            "size": size, "device": device,
            "batch": batch, "params_m": n_all / 1e6, "head_params_m": n_head / 1e6,
            "gflops": count_gflops(model, x), "dim": model.dim, "descriptor_bytes": model.dim * 4,
            "gib_per_1m_images": model.dim * 4 * 1e6 / 2**30,
        })
        models[label] = inference_model(model)   # what extract() runs: BatchNorms folded
    # channels-last, as glimr's extraction feeds the model (glimr/extract/multiscale.py)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    fp32 = time_interleaved(models, x, None, warmup, repeats)
    half = time_interleaved(models, x, torch.bfloat16, warmup, repeats) if bf16 else {}
    for r in rows:
        r["ms_fp32_median"], r["ms_fp32"] = fp32[r["label"]]
        r["ms_bf16_median"], r["ms_bf16"] = half.get(r["label"], (None, None))
    del models
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_overheads(rows: list[dict]) -> None:
    """Time, GFLOPs and parameters relative to GeM on the same backbone and size."""
    base = {(r["backbone"], r["size"]): r for r in rows if r["label"] == "gem"}
    for r in rows:
        b = base.get((r["backbone"], r["size"]))
        for key in ("ms_fp32", "ms_bf16", "ms_fp32_median", "ms_bf16_median", "gflops"):
            r[f"{key}_vs_gem"] = (r[key] / b[key] - 1.0) if b and r[key] is not None and b[key] else None
        t = r["ms_fp32_vs_gem"]
        r["meets_goal"] = None if t is None else t <= GOAL and (r["ms_bf16_vs_gem"] is None or
                                                                 r["ms_bf16_vs_gem"] <= GOAL)


def pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:+.0f}%"


def num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown(rows: list[dict]) -> str:
    head = ("| model | input | params (M) | head params (M) | GFLOPs | ms/img fp32 (fastest / median) "
            "| ms/img bf16 (fastest / median) | time vs GeM fp32 / bf16 (fastest) | time vs GeM fp32 (median) "
            "| descriptor (bytes) | memory 1M images (GiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        flag = "" if r["meets_goal"] in (None, True) else " (over 25%)"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['params_m']:.1f} | {r['head_params_m']:.2f} "
            f"| {r['gflops']:.1f} "
            f"| {num(r['ms_fp32'], '.1f')} / {num(r['ms_fp32_median'], '.1f')} "
            f"| {num(r['ms_bf16'], '.1f')} / {num(r['ms_bf16_median'], '.1f')} "
            f"| {pct(r['ms_fp32_vs_gem'])} / {pct(r['ms_bf16_vs_gem'])}{flag} | {pct(r['ms_fp32_median_vs_gem'])} "
            f"| {r['descriptor_bytes']} | {r['gib_per_1m_images']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default=",".join(HEADS),
                    help="comma-separated heads, each NAME or NAME[key=value;...] (gem is always added: the baseline)")
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--sizes", default="512,1024", help="square input sizes")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast timings")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table (with its setup line) here")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        from glimr.models.cpu import tune_allocator

        tune_allocator()                     # as glimr's extraction does (glimr/models/cpu.py): every head gets it
    heads = parse_heads(args.heads)
    rows = []
    groups = [(b, int(s)) for b in args.backbones.split(",") for s in args.sizes.split(",")]
    for i, (b, s) in enumerate(groups, 1):
        print(f"[{i}/{len(groups)}] {','.join(label for label, _, _ in heads)} on {b} @ {s}, {device}", file=sys.stderr, flush=True)
        rows += bench_group(heads, b, s, device, args.batch, args.warmup, args.repeats, not args.no_bf16)
    add_overheads(rows)
    text = json.dumps(rows, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    setup = (f"Device: {gpu}, batch {args.batch}, {args.warmup} warm-up + {args.repeats} timed runs per model, "
             "models taking turns; time vs GeM from the fastest runs. Goal: +25% at most vs GeM.")
    table = markdown(rows)
    print(f"\n{setup}\n\n{table}")
    if args.markdown:
        args.markdown.write_text(f"`python benchmarks/models.py {shlex.join(argv if argv is not None else sys.argv[1:])}`"
                                 f"\n\n{setup}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
