"""Typed configs for the command line: one dataclass per entry point, flags generated from it.

Each entry point (``reasontune sft``, ``reasontune eval`` …) declares a dataclass whose fields
carry their help text in ``metadata={"help": ...}``. This module turns such a dataclass into
argparse flags (kebab-case, ``--flag/--no-flag`` for booleans), merges an optional
``--config FILE.yaml`` under the flags (flags win), and writes/reads the resolved config as
JSON so that it loads back equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")


def help_field(default: Any, help: str, *, group: str | None = None, aliases: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Returns a dataclass field with a default, command-line help text, its ``--help`` group and alias flag names."""
    metadata = {"help": help, "group": group, "aliases": tuple(aliases)}
    if isinstance(default, (list, dict, set)):
        factory = type(default)(default)
        return dataclasses.field(default_factory=lambda: type(factory)(factory), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def same_field(options_cls: type, name: str, default: Any, aliases: tuple[str, ...] | None = None) -> Any:
    """Returns ``options_cls``'s field ``name`` (help, group, aliases) with another default (and aliases): a command's own take on a shared option."""
    original = {f.name: f for f in dataclasses.fields(options_cls)}[name]
    return help_field(default, original.metadata["help"], group=original.metadata.get("group"),
                      aliases=original.metadata.get("aliases", ()) if aliases is None else aliases)


def positional_field(help: str) -> Any:
    """Returns a required dataclass field given on the command line without a flag (``report RUN_DIR``)."""
    return dataclasses.field(metadata={"help": help, "positional": True})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """Returns (type without Optional, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        allows_none = len(args) != len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], allows_none
        return str, allows_none
    return annotation, False


def _parser_for(annotation: Any, allows_none: bool):
    def parse(text: str):
        if allows_none and text.lower() in ("none", "null"):
            return None
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        if typing.get_origin(annotation) is typing.Literal:
            choices = typing.get_args(annotation)
            if text not in choices:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, choices))}; got {text!r}")
            return text
        return annotation(text)

    parse.__name__ = getattr(annotation, "__name__", "value")
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Adds one flag per field of ``config_cls``, in ``--help`` groups (defaults are left unset: see ``parse_config``)."""
    hints = typing.get_type_hints(config_cls)
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(config_cls):
        annotation, allows_none = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        )
        if field.metadata.get("positional"):
            if typing.get_origin(annotation) is list:  # several values: reasontune compare RUN_A RUN_B …
                (item_type,) = typing.get_args(annotation) or (str,)
                parser.add_argument(field.name, nargs="+", type=item_type, help=help_text)
            else:
                parser.add_argument(field.name, type=_parser_for(annotation, allows_none), help=help_text)
            continue
        group_name = field.metadata.get("group") or "options"
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups[group_name]
        names = [_flag(field.name)] + [_flag(alias) for alias in field.metadata.get("aliases", ())]
        help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        if annotation is bool and not allows_none:
            target.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(annotation) is list:
            (item_type,) = typing.get_args(annotation) or (str,)
            target.add_argument(*names, dest=field.name, nargs="*", type=item_type,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
            target.add_argument(*names, dest=field.name, type=_parser_for(annotation, allows_none),
                                default=argparse.SUPPRESS, metavar="{" + ",".join(choices) + "}" if choices else None,
                                help=help_text)
    parser.add_argument("--config", dest="__config_file", default=None, metavar="FILE.yaml",
                        help="YAML (or JSON) file of option values; flags given on the command line override it")


# config.json's record of a torchrun launch (world size, global batch), written beside the options
LAUNCH_RECORD = "distributed"


def load_config_file(path: str | Path, config_cls: type) -> dict[str, Any]:
    """Reads a YAML/JSON file of options for ``config_cls``; keys may use - or _."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise SystemExit(f"error: config file {path} is not valid YAML: {error}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SystemExit(f"error: config file {path} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(config_cls)}
    values = {}
    raw.pop(LAUNCH_RECORD, None)  # a run's config.json given back as --config: the launch is not an option
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise SystemExit(f"error: config file {path}: unknown option {key!r}; known options: {', '.join(sorted(known))}")
        values[name] = value
    return values


def config_from_namespace(namespace: argparse.Namespace, config_cls: type[ConfigT]) -> ConfigT:
    """Builds the config: dataclass defaults, then the --config file, then explicit flags."""
    values = vars(namespace).copy()
    config_file = values.pop("__config_file", None)
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(load_config_file(config_file, config_cls))
    known = {f.name for f in dataclasses.fields(config_cls)}
    merged.update({k: v for k, v in values.items() if k in known})
    return config_from_dict(merged, config_cls)


def config_from_dict(values: dict[str, Any], config_cls: type[ConfigT]) -> ConfigT:
    """Builds a config from plain values (as read back from config.json), checking types."""
    hints = typing.get_type_hints(config_cls)
    kwargs = {}
    for field in dataclasses.fields(config_cls):
        if field.name not in values:
            continue
        value = values[field.name]
        annotation, allows_none = _base_type(hints[field.name])
        if value is None:
            if not allows_none:
                raise SystemExit(f"error: option {_flag(field.name)} may not be null")
        elif annotation is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            value = float(value)
        elif annotation is int and isinstance(value, str):
            value = int(value)
        elif annotation is bool and isinstance(value, str):
            value = _parser_for(bool, False)(value)
        kwargs[field.name] = value
    unknown = set(values) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise SystemExit(f"error: unknown options: {', '.join(sorted(unknown))}")
    expand_presets = getattr(config_cls, "expand_presets", None)
    if callable(expand_presets):  # e.g. GRPO's --recipe: its settings fill in what was not given
        kwargs = expand_presets(kwargs)
    config = config_cls(**kwargs)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def save_config(config: Any, path: str | Path) -> None:
    """Writes the resolved config as JSON (with the class name) so it can be loaded back equal."""
    payload = dataclasses.asdict(config)
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path, config_cls: type[ConfigT]) -> ConfigT:
    """Reads a config written by ``save_config`` (the launch that torchrun runs record under "distributed" is skipped)."""
    values = json.loads(Path(path).read_text())
    values.pop(LAUNCH_RECORD, None)
    return config_from_dict(values, config_cls)
