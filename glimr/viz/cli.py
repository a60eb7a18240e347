"""`glimr explain`: draw a model's attention maps over an image.

`register(subparsers)` adds the subcommand to glimr's argparse CLI; the parsed namespace carries
`func=run`, which returns the exit status (0 ok, 2 bad input). `python -m glimr.viz.cli explain ...` also
works.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = """example:
  glimr explain photo.jpg --model glam-lite0 --out glam.png
  glimr explain photo.jpg --checkpoint runs/cider/best.safetensors --out cider.png --size 768

Panels: GLAM local_spatial + global_spatial, CiDeR A + masks[i], UGALR G + O, DPLG A, DOLG A
(GeM: local_norm, the L2 norm of the last feature map). Untrained heads show untrained attention:
pass --checkpoint for a trained model."""


def register(subparsers) -> argparse.ArgumentParser:
    from glimr.models.registry import DEFAULT_MODEL

    p = subparsers.add_parser(
        "explain", help="draw a model's attention maps over an image (PNG)",
        description="Run a model on one image and write its attention maps as heat maps over the image, "
                    "one panel per map.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file (JPEG, PNG, ...)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name HEAD-BACKBONE (default {DEFAULT_MODEL}; see `glimr models`)")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint (NAME.safetensors + NAME.json); "
                                                      "overrides --model")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--size", type=int, default=512, help="longest image side fed to the model (default 512)")
    p.add_argument("--weights", choices=("pretrained", "none"), default="pretrained",
                   help="backbone weights when no checkpoint is given (default pretrained)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (default: glimr's cap)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from glimr.io.images import ImageError, load_image
    from glimr.models.backbones import WeightsError
    from glimr.models.checkpoint import CheckpointError
    from glimr.models.registry import build_model
    from glimr.viz.explain import explain

    if args.size < 32:
        print(f"error: --size must be at least 32, not {args.size}", file=sys.stderr)
        return 2
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glimr")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
