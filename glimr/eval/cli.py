"""The ``glimr eval`` and ``glimr bench`` subcommands.

``register(subparsers)`` adds both to an argparse subparsers object; each sets ``func`` (``args -> int``,
the exit status). ``main(argv)`` runs them standalone: ``python -m glimr.eval.cli eval ...``.
"""
from __future__ import annotations

import argparse
import sys

from glimr.config import nonnegative_int, positive_int

EVAL_EXAMPLES = """\
examples:
  glimr eval roxford5k --root data/datasets --model gem-lite0 --scales 3 --json roxf.json
  glimr eval rparis6k --root data/datasets --distractors data/revisitop1m     (RParis6k+1M)
  glimr eval oxford5k --root data/datasets                                    (original protocol)
  glimr eval ukbench --root ../shared/data/ukbench
  glimr eval bench-data/clutter-dev-medium --checkpoint runs/glam/model.safetensors
  glimr eval bench-data/clutter-dev-hard --checkpoint runs/cider-w.safetensors --query-scales 1,0.7071,0.5
  glimr eval ../shared/data/real-dev --rerank sv --cache runs/eval-cache      (spatial verification, top 100)
  glimr eval ../shared/data/real-dev --rerank sv:kind=deep    (verified with the model's own res4 features)

DATASET is roxford5k, rparis6k (Revisited Easy/Medium/Hard), oxford5k, paris6k (original protocol),
ukbench (N-S score), or a folder holding gnd.json, query/ and db/ (Clutter-UKB layout).
ROOT holds gnd_<name>.pkl and the images (revisitop layout: ROOT/roxford5k/{gnd_roxford5k.pkl,jpg/}).
Queries of the Revisited/Oxford sets are cropped to their ground-truth box, as the protocol says.
"""

BENCH_EXAMPLES = """\
example:
  ../shared/tools/build_clutter_dev.sh bench-data
  glimr bench benchmarks/configs/clutter_dev.yaml

CONFIG.yaml lists datasets, models, scale sets and re-rankers (see glimr/eval/bench.py and
benchmarks/configs/clutter_dev.yaml). Writes OUTPUT/results.md (paper-style tables), OUTPUT/results.json
and OUTPUT/plots/ (mAP per method; ranked results, correct outlined green, wrong red). Descriptors are
cached in the config's 'cache' folder, so adding a re-ranker or a dataset reuses what was extracted.
"""


def _add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a model on a benchmark under its published protocol",
                       description="Evaluate a model on a retrieval benchmark under its published protocol "
                                   "and print the metrics (mAP, mP@k; N-S for UKBench).",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="roxford5k | rparis6k | oxford5k | paris6k | ukbench | "
                   "a folder with gnd.json, query/, db/")
    p.add_argument("--root", help="folder holding the dataset (ground truth and images)")
    p.add_argument("--images", help="folder of the Revisited/Oxford images, if not under --root")
    from glimr.models.registry import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (see `glimr models`; default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="a trained checkpoint (.safetensors with its JSON config)")
    p.add_argument("--weights", default="pretrained",
                   help="backbone weights when no checkpoint (default pretrained)")
    p.add_argument("--scales", nargs="+", default=["1"],
                   help='scale set: 1, 3 = cirtorch3 (1/sqrt2, 1, sqrt2), 5 = paper5 (sqrt2^k, k=-3..1: UGALR, DPLG, '
                        'co-attention), 7 = delg7 (0.25 .. 2) or the scales themselves, '
                        'e.g. "1,0.7071,1.4142" or 1 0.7071 1.4142 (the database; and the queries unless '
                        '--query-scales)')
    p.add_argument("--query-scales", nargs="+", default=None,
                   help="the queries' scale set, same syntax as --scales, e.g. 1,0.7071,0.5 (default: the "
                        "checkpoint's recommended query_scales if it has some, else --scales)")
    p.add_argument("--max-size", type=positive_int, default=None,
                   help="longest image side (default: 1024 for Revisited/Oxford as in the papers, "
                        "512 otherwise)")
    p.add_argument("--rerank", default="none",
                   help='re-ranker: "none" or "NAME[:key=value,...]": alpha-qe, aqe, diffusion, coattention, '
                        'sv (spatial verification, e.g. sv:top=100 or sv:kind=deep; local features cached '
                        'under --cache)')
    p.add_argument("--distractors", help="folder of distractor images added to the database (R1M setting)")
    p.add_argument("--no-crop", dest="crop", action="store_false",
                   help="do NOT crop Revisited/Oxford queries to their box (not the protocol; "
                        "reported as such)")
    p.add_argument("--json", dest="json_path", metavar="FILE",
                   help="also write the metrics (and settings) to FILE")
    p.add_argument("--cache", help="folder to cache descriptors in (reused when nothing changed)")
    p.add_argument("--device", default="auto", help='"auto" (GPU if any), "cpu", "cuda", "cuda:1"...')
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="image-decoding processes (default: 0 = in the main process on machines with <= 2 cores, else min(4, cores/2))")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 where the CPU/GPU has native bf16, else fp32 (recorded in the report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)
    return p


def _add_bench(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="run a models x scales x re-rankers x datasets grid; paper-style tables",
                       description="Run a benchmark grid from a YAML config and write a markdown table "
                                   "in the layout of the papers, the JSON behind it, and plots.",
                       epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG.yaml", help="the benchmark config")
    p.add_argument("--output", help="override the config's output folder")
    p.add_argument("--cache", help="override the config's descriptor cache folder")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables and JSON only")
    p.add_argument("--device", default=None, help='override the config\'s device ("auto": GPU if any)')
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_bench_cmd)
    return p


def register(subparsers) -> None:
    """Add ``eval`` and ``bench`` to an argparse subparsers object (from ``add_subparsers()``)."""
    _add_eval(subparsers)
    _add_bench(subparsers)


def run_eval(args) -> int:
    from glimr.eval.evaluate import evaluate  # noqa: PLC0415  (keeps `glimr --help` fast)

    report = evaluate(args.dataset, root=args.root, images=args.images, model=args.model,
                      checkpoint=args.checkpoint, weights=args.weights, scales=",".join(args.scales),
                      query_scales=",".join(args.query_scales) if args.query_scales else None,
                      max_size=args.max_size, rerank=args.rerank, crop=args.crop,
                      distractors=args.distractors,
                      batch_size=args.batch_size, workers=args.workers, progress=not args.quiet,
                      cache_dir=args.cache, device=args.device, precision=args.precision)
    print(report.table())
    if args.json_path:
        report.write_json(args.json_path)
        print(f"metrics written to {args.json_path}")
    return 0


def run_bench_cmd(args) -> int:
    from glimr.eval.bench import load_config, run_bench  # noqa: PLC0415

    cfg = load_config(args.config, output=args.output, cache=args.cache)
    if args.device:
        cfg.device = args.device
    cmd = "glimr bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 and sys.argv[1] == "bench" else None
    res = run_bench(cfg, command=cmd or f"glimr bench {args.config}", plots=args.plots,
                    progress=not args.quiet, quiet=args.quiet)
    print((cfg.output / "results.md").read_text())
    return 0 if res["runs"] else 1


def main(argv: list[str] | None = None) -> int:
    from glimr.cli import run_subcommand

    return run_subcommand(register, argv, "glimr evaluation commands")


if __name__ == "__main__":
    sys.exit(main())
