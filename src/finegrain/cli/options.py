"""Command-line options generated from a config dataclass whose fields are declared with `config.option` (help,
choices, the flag of a bool): one declaration for the command line, `--config` YAML keys and Python keywords.

A dozen lines of our own over argparse rather than a typed-CLI library: argparse already carries the one-line error
contract (cli/main.py's parser), and the generator is all that was missing."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def add_config_options(p: argparse.ArgumentParser, cls: type, *, positional=("data",), required=("out",)) -> None:
    """One argument per field of `cls`: `positional` ones by name, the others `--field-name` (a bool: its
    declared flag, e.g. `--no-finetune`, or `--name`), each defaulting to None so that `--config` and the class's
    defaults apply under it; types, choices and help from the declaration."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, hint = f.metadata, hints[f.name]
        tp = next((t for t in typing.get_args(hint) or (hint,) if t is not type(None)), str)
        text = meta.get("help", "")
        if f.name in positional:
            p.add_argument(f.name, help=text)
            continue
        if tp is bool:
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            p.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", default=None,
                           help=text)  # fmt: skip
            continue
        if f.default not in (None, "") and "default" not in text:
            text = f"{text} (default: {f.default})"
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=text,
                       type=tp if tp in (int, float) else str, choices=meta.get("choices"),
                       required=f.name in required)  # fmt: skip
