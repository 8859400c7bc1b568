"""`finegrain suggest DATA --unlabeled DIR -n 50 --out DIR`: which unlabeled images to label next, as a CSV."""

from __future__ import annotations

import argparse
import os
import sys


def add_suggest_parser(add) -> None:
    """Register the command on the subparsers' `add` (cli/main.py's build_parser)."""
    p = add("suggest", help="which unlabeled images to label next (uncertain and diverse): a CSV to open")
    p.add_argument("data", help="the labelled images: folder (root/class/img, root/train/class/img) or CSV manifest")
    p.add_argument("--unlabeled", required=True, help="folder of images without labels (any depth)")
    p.add_argument("-n", "--n", type=int, default=50, help="how many images to suggest")
    p.add_argument("--out", required=True, help="output folder: suggestions.csv, suggest.json, feature stores")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--view", default="eval", choices=["eval", "full256-flip"], help="extraction view (fit's)")
    p.add_argument("--seed", type=int, default=0, help="the ranking is the same for the same seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")


def cmd_suggest(args: argparse.Namespace) -> int:
    from finegrain.cli.commands import resolve_device
    from finegrain.recipe.unlabeled import suggest

    summary = suggest(
        args.data, args.unlabeled, out=args.out, n=args.n, backbone=args.backbone, view=args.view, seed=args.seed,
        batch_size=args.batch_size, workers=args.workers, precision=args.precision,
        device=resolve_device(args.device), progress=not args.no_progress,
    )  # fmt: skip
    from finegrain.report.suggest_report import suggestion_gallery

    page = suggestion_gallery(summary["suggestions"], os.path.join(args.out, "suggestions.html"), summary=summary)
    rep = summary["propagation"]
    print(f"{summary['n']} of {summary['n_unlabeled']} unlabeled images to label next -> {summary['suggestions']}")
    print(f"  as a gallery: {page}")
    print(f"  label propagation used {rep['n_used']} of them (mean certainty {rep['mean_confidence']})")
    if summary["skipped"]:
        listed = os.path.join(args.out, "features-unlabeled", "skipped.csv")
        print(f"finegrain: {len(summary['skipped'])} unlabeled image(s) skipped: listed in {listed}", file=sys.stderr)
        return 1
    return 0
