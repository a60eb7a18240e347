"""`glimr audit` (find train/test class overlap) and `glimr audit apply` (write the cleaned training CSV).

`register(subparsers)` adds ``audit``; ``python -m glimr.audit.cli audit ...`` also works.
"""
from __future__ import annotations

import argparse
import sys

from glimr.config import int_in

EXAMPLE = """examples:
  glimr audit gldv2/train_clean.csv --images gldv2/train --against roxford5k rparis6k --root data/revisited \\
      --out audit-gldv2
  glimr audit train.csv --images imgs/ --against bench-data/clutter-dev-hard my-test-photos/ --out audit-mine \\
      --index cache/train-index        (a shared training index: a second audit reuses it)
  glimr audit apply audit-gldv2 --decisions decisions.json --out rgldv2_clean.csv

What it does (the RGLDv2-clean procedure of the CiDeR paper, CVPR 2024, Sec. 3):
  1. the training images the CSV lists are embedded once into a glimr index (--index, default AUDIT_DIR/train-index);
  2. every eval image retrieves its --top training candidates (FAISS);
  3. every candidate pair is verified with local features and RANSAC (glimr.rerank.sv): a pair with at least
     --min-inliers inliers is verified; a class is flagged when verified pairs link it to --min-images eval images;
  4. AUDIT_DIR gets candidates.json (every verified pair), flagged.json (flagged classes ranked by evidence) and
     review.html: open it in a browser, confirm or reject each class, export decisions.json;
  5. `glimr audit apply` writes the training CSV without the confirmed classes and the report (AUDIT_DIR/report.md,
     in the form of the paper's Table 2).
An interrupted audit resumes where it stopped (run the same command again).

TRAIN: GLDv2 train.csv (id,url,landmark_id) or train_clean.csv (landmark_id,images); --images holds
a/b/c/<id>.jpg or <id>.jpg. EVAL: roxford5k / rparis6k (with --root: gnd_<name>.pkl and the images; missing
images are reported and skipped), a gnd.json folder (query/ + db/), or a folder of images.
(`glimr audit apply ...`: a training CSV literally named "apply" must be given as ./apply.)"""


def register(subparsers) -> argparse.ArgumentParser:
    from glimr.audit.overlap import DEFAULT_MIN_IMAGES, DEFAULT_MIN_INLIERS, DEFAULT_TOP
    from glimr.cli import _add_model_args

    p = subparsers.add_parser(
        "audit", help="find training classes that show the eval sets' landmarks (train/test overlap)",
        description="Audit a GLDv2-format training set against evaluation sets for class overlap, or apply "
                    "the reviewed decisions (`glimr audit apply AUDIT_DIR --decisions F --out CSV`).",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train", metavar="TRAIN", help="training CSV (GLDv2 format), or the word apply")
    p.add_argument("audit_dir", metavar="AUDIT_DIR", nargs="?", default=None,
                   help="with apply: the folder an audit wrote")
    p.add_argument("--images", metavar="DIR", help="audit: the training image folder")
    p.add_argument("--against", metavar="EVAL", nargs="+",
                   help="audit: roxford5k | rparis6k | a gnd.json folder | an image folder (one or more)")
    p.add_argument("--out", help="audit: the audit folder (AUDIT_DIR); apply: the cleaned CSV to write")
    p.add_argument("--decisions", metavar="FILE", help="apply: decisions.json exported from review.html")
    p.add_argument("--root", default=None,
                   help="folder with gnd_roxford5k.pkl / gnd_rparis6k.pkl and their images "
                        "(default ../shared/data/revisited)")
    p.add_argument("--index", default=None, metavar="DIR",
                   help="the training set's index folder, reused by later audits (default AUDIT_DIR/train-index)")
    p.add_argument("--top", type=int_in(1, 10_000), default=DEFAULT_TOP,
                   help="training candidates retrieved (and verified) per eval image")
    p.add_argument("--min-inliers", type=int_in(4, 100_000), default=DEFAULT_MIN_INLIERS,
                   help="RANSAC inliers that make a pair verified (measured: benchmarks/results/audit_inliers.md)")
    p.add_argument("--min-images", type=int_in(1, 1_000_000), default=DEFAULT_MIN_IMAGES,
                   help="eval images a class needs verified pairs with to be flagged")
    p.add_argument("--evidence", type=int_in(1, 100), default=4, help="best pairs shown per flagged class")
    p.add_argument("--chunk", type=int_in(1, 100_000), default=16,
                   help="eval images per committed work file (the unit an interrupted audit resumes at)")
    p.add_argument("--sv-workers", type=int_in(0, 256), default=0,
                   help="threads for local features and RANSAC (0 = one per CPU core)")
    p.add_argument("--thumb", type=int_in(32, 4096), default=320, help="longest side of review.html's images")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_args(p)
    p.set_defaults(func=run, _parser=p)
    return p


def run(args) -> int:
    p = args._parser
    if args.train == "apply":
        if not args.audit_dir or not args.decisions or not args.out:
            p.error("apply needs AUDIT_DIR, --decisions FILE and --out CSV: glimr audit apply AUDIT_DIR "
                    "--decisions decisions.json --out train_clean.csv")
        if args.images or args.against:
            p.error("--images/--against belong to an audit, not to apply")
        from glimr.audit.pipeline import apply_decisions

        apply_decisions(args.audit_dir, args.decisions, args.out)
        return 0
    if args.audit_dir is not None:
        p.error(f"unexpected argument {args.audit_dir!r} (an audit takes one TRAIN CSV; to apply decisions: "
                "glimr audit apply AUDIT_DIR ...)")
    missing = [o for o, v in (("--images", args.images), ("--against", args.against), ("--out", args.out)) if not v]
    if missing:
        p.error(f"an audit needs {', '.join(missing)}: glimr audit TRAIN --images DIR --against EVAL --out AUDIT_DIR")
    if args.decisions:
        p.error("--decisions belongs to `glimr audit apply`")
    from glimr.audit.overlap import AuditSettings
    from glimr.audit.pipeline import run_audit
    from glimr.cli import extract_settings_from_args, load_model_from_args

    settings = AuditSettings(top=args.top, min_inliers=args.min_inliers, min_images=args.min_images,
                             evidence=args.evidence, chunk=args.chunk, sv_workers=args.sv_workers, thumb=args.thumb)
    ext = extract_settings_from_args(args)
    model = load_model_from_args(args)
    if not args.checkpoint:
        ext = ext.replace(model=getattr(model, "name", None) or args.model)
    run_audit(args.train, args.images, args.against, args.out, model, ext, settings, root=args.root,
              index_dir=args.index, progress=not args.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    from glimr.cli import run_subcommand

    return run_subcommand(register, argv, "glimr audit")


if __name__ == "__main__":
    sys.exit(main())
