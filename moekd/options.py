"""Settings from one source: each command's flags are generated from its options dataclass.

A field declared with `option(default, help)` becomes the flag `--field-name` with that default
and help, written once. A dict field whose entries come from several flags declares them as
`Part`s (e.g. `--instruction-field` fills `fields["instruction"]`); a field given as text on the
command line and parsed (JSON) declares `parse`. `command(group, name, Options)` registers a
Typer command whose flags are the dataclass's, plus `--config FILE`: a YAML (or TOML) file of
settings by field or flag name, which the flags given on the command line override. The command
body receives the filled-in options object.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import typer

from moekd.errors import MoekdError
from moekd.interrupt import Stopped

CONFIG_HELP = (
    "YAML (or TOML) file of settings, keyed by flag name (max_len or max-len); "
    "flags given on the command line override it."
)


@dataclasses.dataclass(frozen=True)
class Part:
    """A flag that fills one entry of a dict option (None: not given)."""

    name: str  # the flag's option name, e.g. instruction_field -> --instruction-field
    key: str  # the entry it fills, e.g. instruction
    type: type
    help: str


def data_field_parts(prefix: str = "") -> tuple[Part, ...]:
    """The flags that name a data set's fields (`fields` options): None keeps the detected field."""
    return (
        Part("instruction_field", "instruction", str, f"{prefix}field holding the instruction (default: instruction)."),
        Part(
            "context_field",
            "context",
            str,
            f"{prefix}field holding the context (default: context or input; '' for none).",
        ),
        Part("response_field", "response", str, f"{prefix}field holding the response (default: response or output)."),
    )


def option(
    default=dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    parse: Callable[[str], object] | None = None,
    parts: tuple[Part, ...] = (),
    argument: bool = False,
    default_factory=dataclasses.MISSING,
):
    """A dataclass field that is also a command-line option (see the module docstring); `argument`: given by
    position (`moekd cache info STORE`) instead of as a flag."""
    metadata = {"help": help, "flag": flag, "parse": parse, "parts": parts, "argument": argument}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _without_none(tp) -> type:
    """`X` of `X | None` (and `tp` itself otherwise)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


@dataclasses.dataclass(frozen=True)
class _Flag:
    """One generated command-line option."""

    name: str  # the Python parameter name (= option name)
    field: str  # the dataclass field it sets
    type: type  # the value's type (without None)
    default: object  # the command line's default: None where the field is required, a part, or parsed
    required: bool
    flag: str
    help: str
    part: Part | None = None
    parse: Callable | None = None
    argument: bool = False

    @property
    def part_key_or_name(self) -> str:
        """Where a recorded settings dict keeps this flag's value."""
        return self.part.key if self.part else self.field

    def parameter(self) -> inspect.Parameter:
        optional = self.required or self.part is not None or self.parse is not None or self.default is None
        annotation = (str if self.parse else self.type) | None if optional else self.type
        if self.argument:
            default = typer.Argument(None, help=self.help, metavar=self.name.upper(), show_default=False)
        elif self.type is bool and not optional:
            default = typer.Option(self.default, self.flag, help=self.help)
        else:
            default = typer.Option(None if optional else self.default, self.flag, help=self.help)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def flags_of(cls) -> list[_Flag]:
    """The command-line options of an options dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue  # not a command-line setting
        for part in meta["parts"]:
            out.append(_Flag(part.name, f.name, part.type, None, False, flag_of(part.name), part.help, part=part))
        if meta["parts"]:
            continue
        tp = _without_none(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required or f.default is dataclasses.MISSING else f.default
        argument = meta.get("argument", False)
        flag = f.name if argument else meta["flag"] or flag_of(f.name)
        help_ = meta["help"] + (" Required (on the command line or in --config)." if required and not argument else "")
        out.append(_Flag(f.name, f.name, tp, default, required, flag, help_, parse=meta["parse"], argument=argument))
    return out


def load_config(path: Path, flags: list[_Flag]) -> dict:
    """Settings of a --config file by option name; a clear error for anything unknown or mistyped."""
    if not path.is_file():
        raise MoekdError(f"--config {path}: no such file")
    if path.suffix == ".toml" and sys.version_info < (3, 11):
        raise MoekdError(f"--config {path}: TOML needs Python 3.11 or newer (tomllib); use a YAML file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # the parsers' own errors name the line
        where = " ".join(str(e).split())  # the parser's message, on one line
        raise MoekdError(
            f"--config {path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} ({where})"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MoekdError(f"--config {path}: expected a mapping of option names to values, got {type(raw).__name__}")
    by_name = {f.name: f for f in flags}
    by_name.update({f.flag[2:].replace("-", "_"): f for f in flags if "/" not in f.flag})  # e.g. samples, json
    dict_fields = {f.field: [g for g in flags if g.field == f.field] for f in flags if f.part is not None}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in dict_fields and isinstance(value, dict):  # e.g. fields: {instruction: question}
            for part_flag in dict_fields[name]:
                if part_flag.part.key in value:
                    values[part_flag.name] = _typed(path, part_flag, value.pop(part_flag.part.key))
            if value:
                raise MoekdError(f"--config {path}: {name} has unknown entries {sorted(value)}")
            continue
        if name not in by_name:
            known = ", ".join(sorted(by_name))
            raise MoekdError(f"--config {path}: unknown setting {key!r}; known settings: {known}")
        values[by_name[name].name] = _typed(path, by_name[name], value)
    return values


def _typed(path: Path, flag: _Flag, value):
    if value is None:
        if flag.required:
            raise MoekdError(f"--config {path}: {flag.name} cannot be empty")
        return None
    if flag.parse is not None:
        return value  # text is parsed like the flag's; a mapping given directly is used as it is
    expected = flag.type
    if typing.get_origin(expected) is list:  # e.g. several --data files
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise MoekdError(f"--config {path}: {flag.name} must be a list, got {value!r}")
        return [str(v) for v in value]
    ok = (
        isinstance(value, bool)
        if expected is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if expected is float
        else isinstance(value, int) and not isinstance(value, bool)
        if expected is int
        else isinstance(value, (str, int, float)) and not isinstance(value, bool)
        if expected in (str, Path)
        else True
    )
    if not ok:
        raise MoekdError(f"--config {path}: {flag.name} must be {expected.__name__}, got {value!r}")
    return float(value) if expected is float else str(value) if expected in (str, Path) else value


def build_options(cls, flags: list[_Flag], values: dict):
    """The options object from option values (None: not given); parts collected, text parsed."""
    kwargs: dict = {}
    for f in flags:
        value = values.get(f.name)
        if f.part is not None:  # every entry, None where not given (as recorded in runs and stores)
            kwargs.setdefault(f.field, {})[f.part.key] = value
            continue
        if f.required and value is None:
            if f.argument:
                raise MoekdError(f"Missing argument '{f.name}': pass it, or set {f.name} in --config")
            raise MoekdError(f"{f.flag} is required: pass it, or set {f.name} in --config")
        if f.parse is not None and isinstance(value, str):
            value = f.parse(value)
        if value is not None:  # else the dataclass's own default
            kwargs[f.field] = value
    return cls(**kwargs)


def read_recorded(path: Path) -> dict | None:
    """Settings a run or build recorded as JSON (None when there are none); an error when the file is torn."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoekdError(f"{path}: the recorded settings are not valid JSON; pass every flag again") from None


def command(group: typer.Typer, name: str, cls, recorded: Callable[[dict], dict | None] | None = None):
    """Register `body(options)` as the command `name` of `group`, its flags generated from `cls`.

    `recorded(values)`, given the settings from the command line and --config by option name, returns
    the settings an earlier run recorded (by field name; None: there is none): a resumed run takes
    those it was not given. Precedence: command line, --config, recorded, default."""
    flags = flags_of(cls)

    def decorator(body):
        def run(ctx: typer.Context, **kwargs):
            config = kwargs.pop("config")
            values = load_config(config, flags) if config is not None else {}
            for f in flags:
                if ctx.get_parameter_source(f.name).name not in ("DEFAULT", "DEFAULT_MAP"):
                    values[f.name] = kwargs[f.name]  # given on the command line: it wins
            if recorded is not None:  # then what the run or store being resumed recorded
                earlier = recorded(values) or {}
                for f in flags:
                    if f.name not in values:
                        known = earlier.get(f.field, {}) if f.part else earlier
                        if isinstance(known, dict) and f.part_key_or_name in known:
                            values[f.name] = known[f.part_key_or_name]
            for f in flags:
                values.setdefault(f.name, kwargs[f.name])
            options = build_options(cls, flags, values)
            try:
                return body(options)
            except KeyboardInterrupt as e:  # typer would turn it into a silent exit 130
                raise Stopped.of(e) from None

        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        parameters = [context, *(f.parameter() for f in flags)]
        parameters.append(
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, "--config", help=CONFIG_HELP),
                annotation=Path | None,
            )
        )
        run.__signature__ = inspect.Signature(parameters)
        run.__name__, run.__doc__ = body.__name__, body.__doc__
        group.command(name)(run)
        return body

    return decorator
