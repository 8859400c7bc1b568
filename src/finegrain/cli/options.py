"""Command-line options generated from a config dataclass whose fields are declared with `config.option` (help,
choices, the flag of a bool): one declaration for the command line, `--config` YAML keys and Python keywords.

Two small generators of our own over argparse rather than a typed-CLI library: argparse already carries the
one-line error contract (cli/main.py's parser), and the generator is all that was missing. `add_config_options` types
each option from its field; `add_value_options` (train's) passes strings on to build_config, for train's older
`key=value` words."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def value_type(hint) -> type:
    """The type an option's value has: `int | None` -> int, `tuple[int, ...]` -> tuple (a comma list)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    tp = next((t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)), str)
    return typing.get_origin(tp) or tp


def add_config_options(p: argparse.ArgumentParser, cls: type, *, positional=("data",), required=("out",),
                       only: tuple[str, ...] | None = None, aliases: dict[str, str] | None = None) -> None:  # fmt: skip
    """One argument per field of `cls` (or of the fields in `only`): `positional` ones by name, the others
    `--field-name` (a bool: its declared flag, e.g. `--no-finetune`, or `--name`; a tuple: a comma list, or several
    words where declared so), each
    defaulting to None so that `--config` and the class's defaults apply under it; types, choices and help from the
    declaration. `aliases`: a short spelling of a field's option (`{"k": "-k"}`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        meta, tp = f.metadata, value_type(hints[f.name])
        text = meta.get("help", "")
        if f.name in positional:  # a tuple: one or more words; None by default: may be left out
            nargs = "+" if tp is tuple else "?" if f.default is None else None
            p.add_argument(f.name, help=text, **({"nargs": nargs} if nargs else {}))
            continue
        if tp is bool:
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            p.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", default=None,
                           help=text)  # fmt: skip
            continue
        if f.default not in (None, "", ()) and "default" not in text:
            shown = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            text = f"{text} (default: {shown})".strip()
        choices = meta.get("choices")
        if choices and any(":" in c for c in choices):  # `pca-whiten:K`: any K; build_config checks the pattern
            choices = None
        names = [*([aliases[f.name]] if aliases and f.name in aliases else []), "--" + f.name.replace("_", "-")]
        kind = csv_list if tp is tuple else tp if tp in (int, float) else str
        words = {"nargs": "+", "type": str} if tp is tuple and meta.get("words") else {"type": kind}
        p.add_argument(*names, dest=f.name, default=None, help=text, choices=choices, required=f.name in required,
                       **words)  # fmt: skip


def field_help(cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def add_value_options(p: argparse.ArgumentParser, cls: type, *, skip: set[str]) -> None:
    """One `--name VALUE` option per field of `cls` (also written `name=VALUE`; a bool alone means true), its help
    from the field's `option` declaration, each value a string that build_config checks and converts: `train`'s
    command line, whose `key=value` words and `--pretrained false` predate `add_config_options` and are kept."""
    group = p.add_argument_group(f"{cls.__name__} options (--name VALUE, or name=VALUE)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        hint = value_type(hints[f.name])
        extra = {"nargs": "?", "const": "true"} if hint is bool else {}
        metavar = {bool: "BOOL", int: "INT", float: "FLOAT", str: "NAME"}.get(hint, "VALUE")
        if hint is bool and f.default is False:  # a flag that turns it on (`--resume`); never eats the next word
            extra, metavar = {"action": "store_const", "const": "true"}, None
        text = f.metadata.get("help", "")
        text = text if "default" in text or default is None else f"{text} (default: {default})".strip()
        extra |= {"metavar": metavar} if metavar else {}
        group.add_argument(flag, dest=f.name, default=None, help=text, **extra)
