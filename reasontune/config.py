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
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")

# The --help groups, in the order a reader looks for them; a field's group outside this list comes after.
GROUP_ORDER = ("data", "model", "optimisation", "rollouts", "expert iteration", "grpo", "generation", "grading",
               "evaluation", "checkpoints", "logging", "run")


class UserError(SystemExit):
    """A mistake of the user's (a flag, a file, a value): the command line prints ``error: …`` lines and exits 2, no traceback.

    ``problems`` holds one ``<flag or file:line:field>: <what is wrong and what to do>`` each. It
    is a ``SystemExit`` so that library code never catches it as an ordinary exception.
    """

    def __init__(self, *problems: str):
        self.problems = [p.removeprefix("error: ") for p in problems]
        super().__init__("\n".join(f"error: {p}" for p in self.problems))


def raise_problems(problems: list[str]) -> None:
    """Raises ``UserError`` naming every problem at once (nothing when the list is empty)."""
    if problems:
        raise UserError(*problems)


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


def positional_field(help: str, default: Any = dataclasses.MISSING) -> Any:
    """Returns a dataclass field given on the command line without a flag (``report RUN_DIR``): required unless it has a ``default``."""
    return dataclasses.field(default=default, metadata={"help": help, "positional": True})


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
    used = {f.metadata.get("group") or "options" for f in dataclasses.fields(config_cls) if not f.metadata.get("positional")}
    groups: dict[str, Any] = {name: parser.add_argument_group(name) for name in GROUP_ORDER if name in used}
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
            elif field.default is not dataclasses.MISSING:  # optional: reasontune models get [NAME]
                parser.add_argument(field.name, nargs="?", default=field.default, type=_parser_for(annotation, allows_none),
                                    metavar=f"[{field.name.upper()}]", help=help_text)
            else:
                choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
                parser.add_argument(field.name, type=_parser_for(annotation, allows_none), help=help_text,
                                    metavar="{" + ",".join(choices) + "}" if choices else None)
            continue
        group_name = field.metadata.get("group") or "options"
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups[group_name]
        names = [_flag(field.name)] + [_flag(alias) for alias in field.metadata.get("aliases", ())]
        help_text = _help_with_default(help_text, default, required=field.metadata.get("required", False)).replace("%", "%%")
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
    run_group = groups.get("run") or parser.add_argument_group("run")
    run_group.add_argument("--config", dest="__config_file", default=None, metavar="FILE.yaml",
                           help="YAML (or JSON) file of option values (a run's config.json too); flags given on the "
                                "command line override it")
    run_group.add_argument("--trust-run-config", dest="__trust_run_config", action="store_true", default=False,
                           help="with --resume (or --config RUN/config.json): accept the run's own reward module, "
                                "server URL, template and benchmark paths without repeating them as flags; only "
                                "for a run directory you wrote")
    run_group.add_argument("--debug", dest="__debug", action="store_true", default=False,
                           help="show the full traceback of an error, also of a user error")


def _help_with_default(help_text: str, default: Any, required: bool = False) -> str:
    """Returns the help text with the real default appended once (none for required flags, unset options or texts that state it)."""
    if required or default in ("", None) or "default" in help_text:
        return help_text
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    return f"{help_text} (default: {shown})" if help_text else f"(default: {shown})"


# config.json's record of a torchrun launch (world size, global batch), written beside the options
LAUNCH_RECORD = "distributed"


def load_config_file(path: str | Path, config_cls: type) -> dict[str, Any]:
    """Reads a YAML/JSON file of options for ``config_cls``; keys may use - or _."""
    raw = read_config_file(path)
    known = {f.name for f in dataclasses.fields(config_cls)}
    command = command_of(config_cls)
    written_by = raw.pop(COMMAND_RECORD, None)
    if written_by is not None and not isinstance(written_by, str):
        raise UserError(f"{path}: field 'command' must name the command that wrote it, got {written_by!r:.40}")
    if written_by is None and is_run_config(path):  # a run's record from before config.json named its command
        written_by = _command_judged_by_options(raw, command)
    if written_by is not None and command is not None and written_by != command:
        raise UserError(_written_by_another(Path(path), written_by, command))
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(sorted(known))}"
            raise UserError(f"{path}: unknown option {key!r}; {hint}")
        values[name] = value
    return values


# The largest config file read (a run's config.json is a few kilobytes) and its deepest nesting (options are flat).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NESTING = 64


def _flow_nesting(text: str) -> int:
    """Returns the deepest nesting of ``[`` / ``{`` outside quoted strings: the YAML parser recurses (slowly) on each level."""
    depth = deepest = 0
    quote = None
    escaped = False
    for char in text:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = None
            continue
        if char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Returns the mapping a YAML/JSON config file holds, with a run's launch record dropped; ``UserError`` naming the file otherwise.

    Parsed with ``yaml.safe_load`` (plain data only: no YAML tags that build objects); the file
    must be UTF-8, at most ``MAX_CONFIG_BYTES``, and hold one mapping.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise UserError(f"--config {path}: is a directory; give a YAML or JSON file (a run's is {path}/config.json)")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(f"--config {path}: {path.stat().st_size} bytes, not a config file (at most {MAX_CONFIG_BYTES})")
        text = path.read_text(encoding="utf-8")
        if _flow_nesting(text) > MAX_CONFIG_NESTING:
            raise UserError(f"--config {path}: nested deeper than {MAX_CONFIG_NESTING} levels; a config file maps "
                            "option names to plain values")
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except UnicodeDecodeError as error:
        raise UserError(f"--config {path}: not UTF-8 text (byte offset {error.start}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        raise UserError(f"--config {path}: not valid YAML: {_one_line(error)}") from None
    except RecursionError:
        raise UserError(f"--config {path}: not valid YAML: nested too deeply") from None
    except ValueError as error:  # a number past int()'s digit limit
        raise UserError(f"--config {path}: not valid YAML: {str(error).split(';')[0]}") from None
    except OSError as error:
        raise UserError(f"--config {path}: cannot be read ({error.strerror})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: must hold a mapping of option names to values")
    raw.pop(LAUNCH_RECORD, None)  # a run's config.json given back as --config: the launch is not an option
    return raw


# config.json's record of the command that wrote it ("sft", "grpo", "eval" …)
COMMAND_RECORD = "command"
# Commands whose output directory is not a training run (nothing there to --resume).
OUTPUT_ONLY_COMMANDS = {"eval": "an eval directory", "filter": "a filter output", "compare": "a compare directory",
                        "report": "a report", "demo": "a demo directory"}


def command_of(config_cls: type) -> str | None:
    """Returns the ``reasontune`` subcommand whose config class is ``config_cls`` (None for a class no command uses)."""
    from reasontune.cli import COMMANDS  # lazy: cli imports this module

    return next((name for name, (_, config_name, _, _) in COMMANDS.items() if config_name == config_cls.__name__), None)


def _command_judged_by_options(raw: dict[str, Any], command: str | None) -> str | None:
    """Returns the command that an old config.json (written before it recorded one) came from, judged by its option names; None when they fit ``command``.

    Only consulted when some option is unknown to ``command``: then the first other command
    whose options include every key is named (importing its module, on this error path only).
    """
    import importlib

    from reasontune.cli import COMMANDS

    keys = {str(key).replace("-", "_") for key in raw}
    if command is None:
        return None
    own = COMMANDS[command]
    if keys <= {f.name for f in dataclasses.fields(getattr(importlib.import_module(own[0]), own[1]))}:
        return None
    for name, (module_name, config_name, _, _) in COMMANDS.items():
        if name == command or name in ("demo", "report", "compare"):
            continue
        try:
            fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module_name), config_name))}
        except (ImportError, AttributeError):
            continue
        if keys <= fields:
            return name
    return None


def _written_by_another(path: Path, written_by: str, command: str) -> str:
    """Returns the refusal of a config file written by another command (a resume of the wrong directory, usually)."""
    run = path.parent if path.name == "config.json" else path
    if written_by in OUTPUT_ONLY_COMMANDS:
        return (f"{run} is {OUTPUT_ONLY_COMMANDS[written_by]} (written by `reasontune {written_by}`), not a `{command}` "
                f"run; give a run directory that `reasontune {command}` wrote")
    return (f"{run} was written by `{written_by}`, not `{command}`; continue it with: reasontune {written_by} --resume "
            f"--output-dir {run}")


def config_from_namespace(namespace: argparse.Namespace, config_cls: type[ConfigT], *,
                          environment: bool = False) -> ConfigT:
    """Builds the config: dataclass defaults, then the --config file, then explicit flags.

    With ``--resume`` and no ``--config``, the run's own ``OUTPUT_DIR/config.json`` takes the
    config file's place, so ``--resume --output-dir RUN`` continues any run, whatever flags started it.
    ``environment`` (the command line) also checks files, model and packages, in the same message.
    """
    values = vars(namespace).copy()
    config_file = values.pop("__config_file", None)
    values.pop("__debug", None)
    trust_run_config = values.pop("__trust_run_config", False)
    known = {f.name for f in dataclasses.fields(config_cls)}
    flags = {k: v for k, v in values.items() if k in known}
    missing_run = None  # why --resume found no run to take the options from
    if not config_file and flags.get("resume") and "output_dir" in flags:
        run = Path(flags["output_dir"])
        saved = run / "config.json"
        config_file = saved if saved.is_file() else None
        if not run.exists():
            missing_run = f"{run} does not exist; check the path, or drop --resume to start a new run there"
        elif config_file is None:
            missing_run = (f"{run} holds no config.json, so it is not a run directory reasontune wrote; check the "
                           "path, or give the run's options as flags")
    file_values, problems = typed_values(load_config_file(config_file, config_cls), config_cls,
                                         where=f"{config_file}: ") if config_file else ({}, [])
    flag_values, flag_problems = typed_values(flags, config_cls)
    raise_problems(problems + flag_problems)  # a wrong value in the file is named even when a flag overrides it
    if config_file and is_run_config(config_file) and not trust_run_config:
        raise_problems(untrusted_run_values(config_file, file_values, flag_values))
    try:
        return config_from_dict({**file_values, **flag_values}, config_cls, environment=environment)
    except UserError:
        if missing_run:  # not the options' fault: the run to continue is not there
            raise UserError(f"--resume --output-dir {flags['output_dir']}: {missing_run}") from None
        raise


def is_run_config(path: str | Path) -> bool:
    """Returns whether a config file is one reasontune wrote into a run directory (``config.json``, or a checkpoint's copy)."""
    return Path(path).name in ("config.json", "reasontune_config.json")


# A run's options that --resume takes from its config.json only when confirmed (see untrusted_run_values).
CONFIRMED_RUN_OPTIONS = ("reward", "vllm_server_url", "vllm_weight_sync_address", "prompt_template", "benchmark_dir")


def _needs_confirming(name: str, value: Any) -> bool:
    from reasontune.options import REWARD_NAMES, SHIPPED_TEMPLATES  # lazy: options imports this module

    if value is None:
        return False
    return not ((name == "reward" and value in REWARD_NAMES) or (name == "prompt_template" and value in SHIPPED_TEMPLATES))


def resume_command(command: str, config: Any) -> str:
    """Returns the command line that resumes ``config``'s run: ``reasontune CMD --resume --output-dir RUN`` plus the options a resume must be told again."""
    import shlex

    flags = [f"{_flag(name)} {shlex.quote(str(getattr(config, name)))}" for name in CONFIRMED_RUN_OPTIONS
             if _needs_confirming(name, getattr(config, name, None))]
    return " ".join([f"reasontune {command} --resume --output-dir {shlex.quote(str(config.output_dir))}", *flags])


def untrusted_run_values(path: str | Path, file_values: dict[str, Any], flag_values: dict[str, Any]) -> list[str]:
    """Returns one refusal naming every value of a run's config.json that would run code or reach beyond the directory, unless a flag repeats it.

    A run directory is data that anyone may have written: its ``reward`` as ``module:function``
    would be imported, its ``vllm_server_url`` would receive the prompts and the weights, its
    prompt template and benchmark directory would be read from paths it chose. The user
    confirms each by giving it on the command line, or all with ``--trust-run-config``.
    """
    risky = [f"{_flag(name)} {file_values[name]}" for name in CONFIRMED_RUN_OPTIONS
             if name not in flag_values and _needs_confirming(name, file_values.get(name))]
    if not risky:
        return []
    return [f"{path} sets {', '.join(risky)}: a run directory is data, not code, and these would be imported, "
            "contacted or read on its say-so; repeat them on the command line, or pass --trust-run-config if you "
            "wrote this run"]


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _coerce(value: Any, annotation: Any) -> Any:
    """Returns ``value`` as ``annotation`` (int, float, bool, str, Literal, list) or raises ValueError saying what was expected."""
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parser_for(bool, False)(value)
            except argparse.ArgumentTypeError as error:
                raise ValueError(str(error)) from None
        raise ValueError(f"expected true or false, got {value!r}")
    if annotation in (int, float):
        # int: whole numbers only (12.5 or "two" is a mistake, not 12); float: any number; never a boolean
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and (annotation is float or float(value).is_integer()):
            return annotation(value)
        if isinstance(value, str):
            try:
                return annotation(value)
            except ValueError:
                pass
        raise ValueError(f"expected {'an integer' if annotation is int else 'a number'}, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    if typing.get_origin(annotation) is list:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (str,)
        return [_coerce(item, item_type) for item in value]
    return value


def config_from_dict(values: dict[str, Any], config_cls: type[ConfigT], *, where: str = "",
                     validate: bool = True, environment: bool = False) -> ConfigT:
    """Builds a config from plain values (a config file, flags, a config.json read back), checking each type.

    Every wrong value and unknown name is named in one ``UserError`` (``where`` prefixes them,
    e.g. the config file); then, with ``validate``, the config's ``validate()`` checks ranges
    and combinations (and with ``environment`` files, the model and packages: ``check_config``).
    """
    kwargs, problems = typed_values(values, config_cls, where)
    raise_problems(problems)
    expand_presets = getattr(config_cls, "expand_presets", None)
    if callable(expand_presets):  # e.g. GRPO's --recipe: its settings fill in what was not given
        kwargs = expand_presets(kwargs)
    config = config_cls(**kwargs)
    if validate:
        check_config(config, environment=environment)
    return config


def typed_values(values: dict[str, Any], config_cls: type, where: str = "") -> tuple[dict[str, Any], list[str]]:
    """Returns (the values converted to their fields' types, a problem for each wrong value or unknown name)."""
    hints = typing.get_type_hints(config_cls)
    kwargs, problems = {}, []
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for name in fields:
        if name not in values:
            continue
        value = values[name]
        annotation, allows_none = _base_type(hints[name])
        if value is None or (allows_none and isinstance(value, str) and value.lower() in ("none", "null")):
            if not allows_none:
                problems.append(f"{where}{_flag(name)}: may not be null; give a value")
                continue
            kwargs[name] = None
            continue
        try:
            kwargs[name] = _coerce(value, annotation)
        except ValueError as error:
            problems.append(f"{where}{_flag(name)}: {error}")
    for name in sorted(set(values) - set(fields)):
        close = difflib.get_close_matches(name, sorted(fields), n=1)
        problems.append(f"{where}unknown option {name!r}" + (f"; did you mean {_flag(close[0])}?" if close else ""))
    return kwargs, problems


def check_config(config: Any, environment: bool = True) -> None:
    """Raises one ``UserError`` naming every problem: the config's own ``validate()`` and (with ``environment``) ``options.environment_problems``.

    A command runs this before it creates or changes its output directory.
    """
    problems: list[str] = []
    check = getattr(config, "validate", None)
    if callable(check):
        try:
            check()
        except UserError as error:
            problems += error.problems
        except SystemExit as error:
            if not (isinstance(error.code, str) and error.code.startswith("error:")):
                raise
            problems += [line.removeprefix("error: ") for line in error.code.splitlines()]
    # The shared option groups (reasontune.options) give a data command's config environment_problems().
    environment_check = getattr(config, "environment_problems", None) if environment else None
    raise_problems(problems + (environment_check() if callable(environment_check) else []))


def save_config(config: Any, path: str | Path) -> None:
    """Writes the resolved config as JSON, with the command that wrote it under ``"command"``, so it can be loaded back equal."""
    payload = dataclasses.asdict(config)
    command = command_of(type(config))
    if command is not None:
        payload[COMMAND_RECORD] = command
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path, config_cls: type[ConfigT]) -> ConfigT:
    """Reads a config written by ``save_config`` (types checked; files and packages are not: the run may have moved).

    The launch that a torchrun run records under "distributed" (world size, global batch) is skipped.
    """
    values = json.loads(Path(path).read_text(encoding="utf-8"))
    values.pop(LAUNCH_RECORD, None)
    values.pop(COMMAND_RECORD, None)
    return config_from_dict(values, config_cls, validate=False)
