"""The `glimr train` subcommand: `register(subparsers)` adds it to glimr's argparse CLI.

Standalone: `python -m glimr.train.cli CONFIG.yaml [key=value ...]`; multi-GPU:
`torchrun --nproc_per_node 4 -m glimr.train.cli CONFIG.yaml`.
"""
from __future__ import annotations

import argparse
import sys

EXAMPLES = """\
examples:
  glimr train configs/train_glam_lite2_real.yaml      (the real-photo recipe: real views, no pasting)
  glimr train configs/train_glam_lite0_composites.yaml
  glimr train configs/train_glam_lite0_composites.yaml optim.epochs=2 run.out=runs/quick
  glimr train configs/train_glam_lite0_composites.yaml --resume        (continue after a stop or a crash)
  glimr train configs/train_ugalr_lite0_composites.yaml loss.margin=0.15 loss.scale=30
  torchrun --nproc_per_node 8 -m glimr.train.cli configs/paper_glam_resnet101_gldv2.yaml   (multi-GPU DDP)

CONFIG.yaml sections (every key has a default; see glimr/train/trainer.py and configs/):
  model: HEAD-BACKBONE (glam-lite0, ugalr-lite0, ...), head_kwargs: {...}, weights: pretrained | none
  data:   kind composites | views | csv | gldv2, photos / csv / root, groups (views: one class per
          sub-folder, e.g. webcams), long_side, n_groups (group-size batches), warp (views),
          size_mode group | square (long_side x long_side),
          sampler random | class_balanced, per_class, paste_scale, p_clean, illumination, seed
  cache:  enabled (frozen backbone + on-disk feature cache), dir, stage res5 (head only) | res4 (res5 + head),
          views_per_class, dtype
  loss:   kind arcface | contrastive, margin, scale, inter_weight (UGALR lambda)
  optim:  trainable all | res5+head | head, epochs, max_steps, batch_size (per process),
          global_batch_size (all GPUs x accum_steps), accum_steps, lr, momentum, weight_decay,
          warmup_steps | warmup_epochs, min_lr_ratio, grad_clip, init_whiten none | pca (GeM's FC), init_shrink
The papers' own recipes (ResNet on GLDv2-clean, every value with its source): configs/paper_*.yaml
  run:    out, device, precision auto | fp32 | bf16 | fp16, workers, save_every, keep, log_every, seed
Overrides: key=value with dotted keys (values in YAML: optim.lr=0.02, data.paste_scale=[0.2,0.6]), right
after CONFIG; put --options before CONFIG or after the overrides.

Writes OUT/config.yaml, OUT/log.jsonl (loss, lr, images/s), OUT/checkpoints/step-N/ (model + optimizer +
random state, safetensors + JSON, with config.yaml), and the trained model OUT/model.safetensors + .json:
  glimr eval bench-data/clutter-dev-hard --checkpoint OUT/model.safetensors
"""


def _add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model (any head) with ArcFace; frozen-backbone cache for CPUs",
                       description="Train a glimr model from a YAML config (plus key=value overrides). "
                                   "Saves the config next to every checkpoint; --resume continues exactly.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG.yaml", help="training config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint of run.out (OUT/checkpoints/latest.json)")
    p.add_argument("--resume-from", metavar="CHECKPOINT_DIR", help="continue from this checkpoint folder")
    p.add_argument("--out", help="shorthand for run.out=OUT")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_train)
    return p


def register(subparsers) -> None:
    """Add `train` to an argparse subparsers object (from `add_subparsers()`)."""
    _add(subparsers)


def run_train(args) -> int:
    from glimr.train.trainer import dump_config, load_config, train

    overrides = list(args.overrides or [])
    if args.out:
        overrides.append(f"run.out={args.out}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    summary = train(cfg, resume=args.resume_from or args.resume)
    print(f"trained {cfg.model}: {summary['steps']} steps in {summary['seconds']} s -> "
          f"{summary['out']}/model.safetensors")
    return 0


def main(argv: list[str] | None = None) -> int:
    from glimr.cli import run_subcommand

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        argv = ["train", *argv]
    return run_subcommand(register, argv, "glimr training")


if __name__ == "__main__":
    sys.exit(main())
