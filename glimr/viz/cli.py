"""`glimr explain`: draw a model's attention maps over an image.

`register(subparsers)` adds the subcommand to glimr's argparse CLI; the parsed namespace carries
`func=run`, which returns the exit status (0 ok, 2 bad input). `python -m glimr.viz.cli explain ...` also
works.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glimr.config import positive_int

EXAMPLE = """example:
  glimr explain photo.jpg --model glam-lite0 --out glam.png
  glimr explain photo.jpg --checkpoint runs/cider/best.safetensors --out cider.png --size 768
  glimr explain --query q.jpg --crop 40,30,300,260 cand1.jpg cand2.jpg --out coatt.png
  glimr explain --query q.jpg --index my-index cand1.jpg --out coatt.png     # the index's model and PCA

Panels: GLAM local_spatial + global_spatial, CiDeR A + masks[i], UGALR G + O, DPLG A, DOLG A
(GeM: local_norm, the L2 norm of the last feature map). Untrained heads show untrained attention:
pass --checkpoint for a trained model.

With --query: co-attention maps (Hu & Bors 2023, Fig. 7), one row per candidate IMAGE: the query, the
candidate with its co-attention score S, the candidate's co-attention map for this query (every selected
local feature takes its cluster's weight a'_i) and its query-insensitive L2-norm attention."""


def register(subparsers) -> argparse.ArgumentParser:
    from glimr.models.registry import DEFAULT_MODEL

    p = subparsers.add_parser(
        "explain", help="draw a model's attention maps over an image (PNG)",
        description="Run a model on one image and write its attention maps as heat maps over the image, "
                    "one panel per map.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image file (JPEG, PNG, ...); with --query, one or more candidate images")
    p.add_argument("--query", default=None, metavar="Q",
                   help="query image: draw the co-attention maps of the candidate IMAGEs for this query")
    p.add_argument("--crop", default=None, metavar="x0,y0,x1,y1", help="with --query: crop the query to this box")
    p.add_argument("--index", default=None, metavar="DIR",
                   help="with --query: an index built with --coattention; its model, scales, size and PCA are "
                        "used (else the model's own space at --size, the paper's 5 scales)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name HEAD-BACKBONE (default {DEFAULT_MODEL}; see `glimr models`)")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint (NAME.safetensors + NAME.json); "
                                                      "overrides --model")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--size", type=positive_int, default=None,
                   help="longest image side fed to the model (default 512, or the index's with --index)")
    p.add_argument("--weights", choices=("pretrained", "none"), default="pretrained",
                   help="backbone weights when no checkpoint is given (default pretrained)")
    p.add_argument("--max-pixels", type=positive_int, default=None, help="refuse larger images (default: glimr's cap)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from glimr.io.images import ImageError, load_image
    from glimr.models.backbones import WeightsError
    from glimr.models.checkpoint import CheckpointError
    from glimr.models.registry import build_model
    from glimr.viz.explain import explain

    if args.size is not None and args.size < 32:
        print(f"error: --size must be at least 32, not {args.size}", file=sys.stderr)
        return 2
    if args.query is not None:
        return _run_coattention(args)
    if args.crop is not None or args.index is not None:
        print("error: --crop and --index go with --query (co-attention maps)", file=sys.stderr)
        return 2
    if len(args.images) != 1:
        print(f"error: explain draws one image's attention maps, {len(args.images)} were given "
              "(several candidate images go with --query Q)", file=sys.stderr)
        return 2
    args.image, args.size = args.images[0], args.size or 512
    kw = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
    try:
        image = load_image(args.image, target_size=args.size, **kw)
    except (ImageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = build_model(args.model, checkpoint=args.checkpoint, weights=args.weights)
    except (ValueError, WeightsError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = f"{model.name}: {Path(args.image).name}"
    out, maps = explain(model, image, args.out, size=args.size, title=title)
    print(f"wrote {out} ({len(maps)} maps: {', '.join(maps)})")
    return 0


def _run_coattention(args: argparse.Namespace) -> int:
    from glimr.extract.multiscale import parse_box
    from glimr.index.store import IndexStoreError
    from glimr.io.images import ImageError
    from glimr.models.backbones import WeightsError
    from glimr.models.checkpoint import CheckpointError
    from glimr.viz.coattention_maps import render_coattention

    try:
        box = parse_box(args.crop) if args.crop is not None else None
    except ValueError as e:
        print(f"error: --crop: {e}", file=sys.stderr)
        return 2
    if args.index is not None and not (Path(args.index) / "coattention").is_dir():
        print(f"error: {args.index} is not an index built with co-attention records: build it with "
              f"`glimr index build IMAGES --index {args.index} --coattention`, or leave out --index",
              file=sys.stderr)
        return 2
    for path in [args.query, *args.images]:
        if not Path(path).is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    explicit = args.checkpoint is not None or args.model != _default_model()
    try:
        out = render_coattention(args.query, args.images, args.out, model_name=args.model if explicit else None,
                                 checkpoint=args.checkpoint, index=args.index, box=box, max_size=args.size)
    except (ImageError, OSError, ValueError, WeightsError, CheckpointError, IndexStoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (co-attention maps of {len(args.images)} candidate(s) for {Path(args.query).name})")
    return 0


def _default_model() -> str:
    from glimr.models.registry import DEFAULT_MODEL

    return DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    from glimr.cli import run_subcommand

    return run_subcommand(register, argv, "glimr explain")


if __name__ == "__main__":
    sys.exit(main())
