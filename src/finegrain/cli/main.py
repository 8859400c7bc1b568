"""`finegrain` command line: parse, build a typed config, call the library.

Exit codes: 0 all done; 1 partly done (some inputs skipped: the summary says how many and where they are listed);
2 usage or input error, nothing done (one line on stderr, never a traceback). Results go to stdout, messages to
stderr.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import typing
import warnings

from finegrain.cli.options import add_config_options, add_value_options, field_help
from finegrain.cli.suggest_cmd import add_suggest_parser
from finegrain.config import (
    EVALUATE_OPTIONS,
    DemoConfig,
    EvalConfig,
    EvaluateConfig,
    ExplainConfig,
    ExportConfig,
    ExtractConfig,
    FitConfig,
    FixresConfig,
    PredictConfig,
    ReportConfig,
    SearchConfig,
    ServeConfig,
    TrainConfig,
)
from finegrain.errors import FinegrainError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless it has none worth showing (None, a flag) or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class UsageError(FinegrainError):
    """A command line argparse cannot read: reported in the one error format, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="finegrain", description="Fine-grained image recognition from small data.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__import__('finegrain').__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=_HelpFormatter)

    p = add("fit", help="folder -> the best model in a time budget (chosen on validation), then predict")
    add_config_options(p, FitConfig)  # every option declared once, in recipe.fit.FitConfig
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("extract", help="images -> feature store (resumable)")
    add_config_options(p, ExtractConfig)  # every option declared once, in config.ExtractConfig
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    common = ("out", "pooling", "norm", "train_split", "test_split", "seed")  # config.EvalConfig's, for every store
    for name, text, own in (
        ("knn", "k-nearest-neighbour classifier on a store", ("k", "metric", "weights", "temperature")),
        ("ncm", "nearest class mean classifier on a store", ("metric",)),
        ("probe", "logistic-regression probe on a store (C chosen on a validation split)", ("solver",)),
    ):
        p = add(name, help=text)
        add_config_options(p, EvalConfig, positional=("store",), required=(), only=("store", *common, *own),
                           aliases={"k": "-k"})  # fmt: skip
        p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("search", help="nearest images of a query image in a store")
    add_config_options(p, SearchConfig, positional=("store",), required=(), aliases={"k": "-k"})
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("train", help="fine-tune a backbone by regime (head, last:K, full, scratch); torchrun for DDP")
    p.add_argument("data", help=field_help(TrainConfig, "data"))
    p.add_argument("--out", required=True, help=field_help(TrainConfig, "out"))
    p.add_argument("--config", help="YAML file of options (command-line values win)")
    p.add_argument("--no-progress", action="store_true")
    add_value_options(p, TrainConfig, skip={"data", "out"})  # every option declared once, in TrainConfig
    p.epilog = "Every option is also key=value, e.g. epochs=15 lr=0.02 augment=randaugment mixup=0.2"

    p = add("predict", help="classify images with a trained model")
    add_config_options(p, PredictConfig, positional=("model", "images"), required=(), aliases={"k": "-k"})
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("evaluate", help="metrics with intervals, calibration, confusions; TTA and ensembles")
    # every option declared once, in config.EvaluateConfig
    add_config_options(p, EvaluateConfig, positional=("models", "data"), required=(), only=EVALUATE_OPTIONS)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (for scripts) instead of text")
    p.add_argument("--no-progress", action="store_true")

    p = add("explain", help="CAM / Grad-CAM / attention heatmaps and boxes for images")
    add_config_options(p, ExplainConfig, positional=("model", "images"), required=())
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("fixres", help="adapt a model to a higher test resolution (BatchNorm statistics + head)")
    add_config_options(p, FixresConfig, positional=("model", "data"), required=())
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("report", help="one self-contained HTML report of a run (fit's leads with its leaderboard)")
    add_config_options(p, ReportConfig, positional=("run",), required=())
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("demo", help="fit (2 minutes) on the bundled 10-species bird sample, then predict with the model")
    add_config_options(p, DemoConfig, positional=(), required=())
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("serve", help="serve a model over HTTP: POST /predict, GET /model, /health, and a page at /")
    add_config_options(p, ServeConfig, positional=("model",), required=(), aliases={"k": "-k"})
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    p = add("export", help="a model -> ONNX (dynamic batch, classes + preprocessing inside), checked vs PyTorch")
    add_config_options(p, ExportConfig, positional=("model",), required=())
    p.add_argument("--config", help="YAML file of options (command-line values win)")

    add_suggest_parser(add)
    add("backbones", help="list the backbones that work offline")
    _config_everywhere(sub)
    return ap


# Commands whose options are a typed config (build_config reads --config itself, with the same validation)
CONFIG_COMMANDS = {"fit", "extract", "knn", "ncm", "probe", "train", "evaluate", "predict", "explain", "fixres",
                   "report", "serve", "export", "search", "suggest", "demo"}  # fmt: skip


def _config_everywhere(sub: argparse._SubParsersAction) -> None:
    """Every command takes --config FILE.yaml: its keys are the command's options (dashes or underscores)."""
    for p in sub.choices.values():
        if not any("--config" in a.option_strings for a in p._actions):
            p.add_argument("--config", help="YAML file of this command's options (command-line values win)")


def _config_path(argv: list[str]) -> str | None:
    """The value of --config in a command line (the last one given), None without one."""
    path = None
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif word.startswith("--config="):
            path = word.split("=", 1)[1]
    return path


def _yaml_defaults(p: argparse.ArgumentParser, path: str) -> dict:
    """The --config file of a plain command as parser defaults, each checked as if typed on the command line."""
    from finegrain.config import read_yaml

    actions = {a.dest: a for a in p._actions if a.option_strings and a.dest not in ("help", "config")}
    values = read_yaml(path)  # one reader for every --config file: a mapping, keys with dashes or underscores
    unknown = sorted(set(values) - actions.keys())
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)} in {path}; valid: {', '.join(sorted(actions))}")
    for key, value in values.items():
        action = actions[key]
        if action.type is not None and value is not None:
            try:
                value = action.type(value if isinstance(value, str) else str(value))
            except (TypeError, ValueError):
                raise UsageError(f"{key} in {path}: invalid {action.type.__name__} value {value!r}") from None
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"{key} in {path} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        values[key] = value
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; `key=value` words (train only) land in args.overrides. Raises UsageError."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    path = _config_path(argv)
    if path and argv[0] in commands and argv[0] not in CONFIG_COMMANDS:
        sub = commands[argv[0]]
        values = _yaml_defaults(sub, path)
        for action in sub._actions:
            action.required = action.required and action.dest not in values  # given in the file
        sub.set_defaults(**values)
    args, extra = parser.parse_known_args(argv)
    overrides = [t for t in extra if "=" in t and not t.startswith("-")]
    bad = [t for t in extra if t not in overrides or args.command != "train"]
    if bad:
        hint = "; train options are --name VALUE or name=VALUE" if args.command == "train" else ""
        raise UsageError(f"unrecognized arguments: {' '.join(bad)} (see finegrain {args.command} --help{hint})")
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 done, 1 partly done, 2 usage or input error)."""
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # one line, no source echo
    try:
        args = parse_args(argv)
        from finegrain.cli import commands

        if args.command == "serve":
            from finegrain.cli import serve_cmd as commands
        if args.command == "suggest":
            from finegrain.cli import suggest_cmd as commands
        if args.command == "export":
            from finegrain.cli import export_cmd as commands
        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except FinegrainError as e:
        print(f"finegrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finegrain: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
