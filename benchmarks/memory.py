"""Peak memory (RSS) of indexing, of one search and of decoding a 48-megapixel PNG, each in its own process.

    python benchmarks/memory.py                       # this checkout's glimr, 1,000 photos, default model
    python benchmarks/memory.py --code /path/to/other/checkout --label before   # the same on other code
    python benchmarks/memory.py --model gem-lite0 --images ../shared/data/photos --out benchmarks/results/memory

Each measurement runs `python -m glimr.cli ...` (or a small decode script) as a child process and reads its
peak resident set size from the kernel (os.wait4 -> ru_maxrss), so nothing of the benchmark itself is counted.
Prints JSON and markdown; with --out writes OUT.json (measurements appended under --label) and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DECODE = """
import sys
from glimr.io.images import load_image
im = load_image(sys.argv[1], target_size=int(sys.argv[2]))
print(im.size)
"""


def run_measured(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    """(peak RSS in MiB, wall seconds, stdout) of one child process (its rusage, from os.wait4)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        text, errs = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{errs[-3000:]}")
    return ru.ru_maxrss / 1024, wall, text


MAKE_PNG = """
import sys
from PIL import Image, ImageFilter
src = Image.open(sys.argv[1]).convert(sys.argv[5])
big = src.resize((int(sys.argv[3]), int(sys.argv[4])), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1))
big.save(sys.argv[2], compress_level=1)
"""


def make_png(path: Path, width: int = 8000, height: int = 6000, mode: str = "RGB") -> None:
    """A 48 MP PNG with photo-like content (a real photo scaled up and blurred, so it compresses like one),
    made in a child process: a child's ru_maxrss starts from its parent's RSS at fork (Linux keeps the high-water
    mark across exec), so the benchmark itself must never hold big images."""
    src = ROOT.parent / "shared" / "data" / "ukbench" / "ukbench00000.jpg"
    subprocess.run([sys.executable, "-c", MAKE_PNG, str(src), str(path), str(width), str(height), mode], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "photos"))
    ap.add_argument("--model", default=None, help="default: glimr's default model")
    ap.add_argument("--query", default=None, help="default: the first image of --images")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose glimr is measured (PYTHONPATH)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--png-size", default="8000x6000")
    ap.add_argument("--only", default="import,index,search,png", help="comma list of the measurements")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(Path(args.code).resolve())}
    py = sys.executable
    model = ["--model", args.model] if args.model else []
    tmp = Path(tempfile.mkdtemp(prefix="glimr-mem-"))
    res: dict = {"code": str(Path(args.code).resolve()), "model": args.model or "default",
                 "images": args.images, "cpus": os.cpu_count()}
    only = set(args.only.split(","))
    try:
        if "import" in only:
            rss, wall, _ = run_measured([py, "-c", "import torch, glimr.cli"], env, tmp)
            res["import_torch_glimr"] = {"peak_rss_mib": round(rss, 1), "seconds": round(wall, 1)}
        if "index" in only or "search" in only:
            n = sum(1 for _ in Path(args.images).iterdir())
            print(f"indexing {n} files of {args.images} ...", file=sys.stderr)
            rss, wall, out = run_measured([py, "-m", "glimr.cli", "index", "build", args.images, "--index",
                                           str(tmp / "idx"), *model], env, tmp)
            res["index_build"] = {"files": n, "peak_rss_mib": round(rss, 1), "seconds": round(wall, 1),
                                  "report": out.strip().splitlines()[-1]}
        if "search" in only:
            q = args.query or str(min(Path(args.images).iterdir()))
            rss, wall, out = run_measured([py, "-m", "glimr.cli", "search", str(tmp / "idx"), q, "--top", "10"],
                                          env, tmp)
            res["search_one"] = {"peak_rss_mib": round(rss, 1), "seconds": round(wall, 1),
                                 "first": out.strip().splitlines()[0] if out.strip() else ""}
        if "png" in only:
            w, h = (int(v) for v in args.png_size.split("x"))
            base, _, _ = run_measured([py, "-c", "import glimr.io.images, PIL.Image"], env, tmp)
            for mode in ("RGB", "RGBA"):
                png = tmp / f"big-{mode}.png"
                make_png(png, w, h, mode)
                rss, wall, out = run_measured([py, "-c", DECODE, str(png), "512"], env, tmp)
                res[f"png_decode_{mode.lower()}"] = {
                    "pixels": w * h, "mode": mode, "file_mib": round(png.stat().st_size / 2**20, 1),
                    "target_size": 512, "peak_rss_mib": round(rss, 1), "seconds": round(wall, 1),
                    "interpreter_rss_mib": round(base, 1), "decoded_size": out.strip()}
                png.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        js = out.with_suffix(".json")
        allres = json.loads(js.read_text()) if js.exists() else {}
        allres[args.label] = res
        js.write_text(json.dumps(allres, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(allres))
    return 0


def markdown(allres: dict) -> str:
    rows = [("import torch + glimr", "import_torch_glimr"), ("index build", "index_build"),
            ("one search", "search_one"), ("48 MP RGB PNG -> 512 view", "png_decode_rgb"),
            ("48 MP RGBA PNG -> 512 view", "png_decode_rgba"),
            ("(python + glimr.io.images + PIL, for the PNG rows)", "png_decode_rgb:interpreter")]
    labels = list(allres)
    lines = ["| measurement | " + " | ".join(f"{lb}: peak RSS MiB (s)" for lb in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for title, key in rows:
        cells = []
        for lb in labels:
            k, _, field = key.partition(":")
            r = allres[lb].get(k)
            if r and field:
                cells.append(f"{r['interpreter_rss_mib']:.0f}")
            else:
                cells.append(f"{r['peak_rss_mib']:.0f} ({r['seconds']:.0f} s)" if r else "-")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
