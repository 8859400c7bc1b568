"""`finegrain suggest DATA --unlabeled DIR -n 50 --out DIR`: which unlabeled images to label next, as a CSV."""

from __future__ import annotations

import argparse
import os
import sys


def add_suggest_parser(add) -> None:
    """Register the command on the subparsers' `add` (cli/main.py's build_parser)."""
    from finegrain.cli.options import add_config_options
    from finegrain.config import SuggestConfig

    p = add("suggest", help="which unlabeled images to label next (uncertain and diverse): a CSV to open")
    add_config_options(p, SuggestConfig, positional=("data",), required=(), aliases={"n": "-n"})
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML file of options (command-line values win)")


def cmd_suggest(args: argparse.Namespace) -> int:
    from finegrain.cli.commands import _cli_config, _overrides
    from finegrain.config import SuggestConfig, config_choices
    from finegrain.recipe.unlabeled import suggest

    progress = not args.no_progress
    args = _cli_config(SuggestConfig, args, _overrides(args, SuggestConfig), config_choices(SuggestConfig))
    summary = suggest(args, progress=progress)
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
