"""Settings declared once: a stage's dataclass is the source of every option's default, help, choices
and bounds, and the command line and the run config are derived from it.

    @dataclass
    class FilterConfig:
        traces: Path = option(help="Traces JSONL.", argument=True)
        keep: str = option("all-correct", "Which traces to keep.", choices=KEEP_MODES)

`typer_command(FilterConfig, run)` turns the fields into typer options (`--keep`, bools as
`--x/--no-x`, lists as repeated options or one comma-separated string), so that `--help` shows every
field's help and default; `settings_from_table(FilterConfig, table, "filter")` reads a TOML table into
the same dataclass (unknown keys and wrong types are one-line errors, paths are resolved against the
config's folder); `validate(obj, name)` checks choices and bounds from the declarations and then the
dataclass's own `check(name)` for rules that involve several fields. `name` turns a field name into
the caller's vocabulary: `--lr` on the command line, `train.lr` in a config. Why one declaration: a
default, a choice list or a bound written in two places drifts apart (it did: LoRA dropout, the eval
fraction and the batch size differed between `distill train` and `distill run`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from distill.errors import DistillError

Namer = Callable[[str], str]
METADATA_KEY = "distill.option"


@dataclass(frozen=True)
class Spec:
    """What `option` records about a field (in the dataclass field's metadata)."""

    help: str = ""
    choices: tuple | None = None  # allowed values (for a dict field: allowed keys)
    minimum: float | None = None  # value >= minimum
    exclusive_minimum: float | None = None  # value > exclusive_minimum
    maximum: float | None = None  # value <= maximum
    exclusive_maximum: float | None = None  # value < exclusive_maximum
    flag: str | None = None  # the long flag when it is not --field-name (e.g. --field for `fields`)
    short: str | None = None  # a short flag such as -n
    argument: bool = False  # a positional CLI argument instead of an option
    sep: str | None = None  # a list field given on the CLI as one string joined by `sep`
    cli: bool = True  # reachable from the command line
    in_config: bool = True  # reachable from a config file section
    reason: str = ""  # why a field is not reachable from one of the two
    metavar: str | None = None
    auto: bool = False  # an int field that also takes the word "auto" (decided at run time, e.g. --batch-tokens)


AUTO = "auto"


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **spec: Any):
    """A dataclass field carrying its option declaration; no default makes it a required field
    (a required CLI option, or argument with `argument=True`)."""
    if "choices" in spec and spec["choices"] is not None:
        spec["choices"] = tuple(spec["choices"])
    meta = {METADATA_KEY: Spec(help=help, **spec)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Declared:
    """One field of a settings dataclass with its resolved type and declaration."""

    name: str
    type: Any
    spec: Spec
    default: Any  # MISSING when required

    @property
    def required(self) -> bool:
        return self.default is MISSING


def declared(cls) -> list[Declared]:
    """The fields of `cls` in order, with resolved types (fields without `option` get an empty Spec)."""
    return list(_declared(cls if isinstance(cls, type) else type(cls)))


@functools.lru_cache(maxsize=None)
def _declared(cls) -> tuple[Declared, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        out.append(Declared(f.name, hints[f.name], f.metadata.get(METADATA_KEY, Spec()), default))
    return tuple(out)


def defaults(cls) -> dict[str, Any]:
    return {d.name: d.default for d in declared(cls) if not d.required}


def blank(cls, **values):
    """An instance of `cls` with None for every required field not given (a config section whose
    required fields the pipeline fills in when it runs the stage)."""
    filled = {d.name: None for d in declared(cls) if d.required}
    return cls(**{**filled, **values})


# ------------------------------------------------------------------------------------------ names


def cli_flag(d: Declared) -> str:
    return d.spec.flag or "--" + d.name.replace("_", "-")


def cli_names(cls) -> Namer:
    """field name -> its command-line spelling (`--lr`, `--field`, `MODEL` for an argument)."""
    flags = {d.name: (d.name.upper() if d.spec.argument else cli_flag(d)) for d in declared(cls)}
    return lambda name: flags.get(name, "--" + name.replace("_", "-"))


def config_names(section: str) -> Namer:
    """field name -> its config spelling (`train.lr`)."""
    return lambda name: f"{section}.{name}"


# ------------------------------------------------------------------------------------------ types


def _optional(tp) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _kind(tp) -> str:
    """bool | int | float | str | path | list | dict (a list or dict holds strings)."""
    inner, _ = _optional(tp)
    origin = typing.get_origin(inner)
    if inner in (bool, int, float, str):
        return inner.__name__
    if inner is Path:
        return "path"
    if origin in (list, tuple) or inner in (list, tuple):
        return "list"
    if origin is dict or inner is dict:
        return "dict"
    raise TypeError(f"unsupported option type {tp!r}")


def parse_assignments(items: Iterable[str] | None, *, keys: Iterable[str] | None, flag: str) -> dict[str, str]:
    """FIELD=COLUMN items (`--field question=problem`: read the data's column `problem` as the
    question) as a dict; FIELD must be one of `keys`. Every command that maps columns reads them here."""
    keys = tuple(keys) if keys is not None else None
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = str(item).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise DistillError(f"{flag} {item!r} must look like FIELD=COLUMN" + (f", FIELD one of {', '.join(keys)}" if keys else ""))
        if keys is not None and name not in keys:
            raise DistillError(f"{flag} {item!r}: FIELD must be one of {', '.join(keys)}")
        out[name] = value
    return out


# ------------------------------------------------------------------------------------------ validation


def _bounds_text(spec: Spec) -> str:
    lo = f"({spec.exclusive_minimum:g}" if spec.exclusive_minimum is not None else (
        f"[{spec.minimum:g}" if spec.minimum is not None else None)
    hi = f"{spec.exclusive_maximum:g})" if spec.exclusive_maximum is not None else (
        f"{spec.maximum:g}]" if spec.maximum is not None else None)
    if lo and hi:
        return f"in {lo}, {hi}"
    if spec.exclusive_minimum is not None:
        return "positive" if spec.exclusive_minimum == 0 else f"> {spec.exclusive_minimum:g}"
    if spec.minimum is not None:
        return f"at least {spec.minimum:g}"
    if spec.exclusive_maximum is not None:
        return f"< {spec.exclusive_maximum:g}"
    return f"at most {spec.maximum:g}"


def _check_value(d: Declared, value, label: str) -> None:
    spec, kind = d.spec, _kind(d.type)
    if spec.auto and isinstance(value, str):
        if value == AUTO:
            return
        raise DistillError(f"{label} must be a number of tokens or {AUTO}, got {value!r}")
    if spec.choices is not None:
        if kind == "dict":
            bad = [k for k in value if k not in spec.choices]
            if bad:
                raise DistillError(f"{label} {bad[0]}=...: FIELD must be one of {', '.join(spec.choices)}")
        elif kind == "list":
            bad = [v for v in value if v not in spec.choices]
            if bad:
                raise DistillError(f"unknown {label} {bad[0]!r}; use one of {', '.join(map(str, spec.choices))}")
        elif value not in spec.choices:
            raise DistillError(f"unknown {label} {value!r}; use one of {', '.join(map(str, spec.choices))}")
    if kind in ("int", "float") and any(b is not None for b in (spec.minimum, spec.exclusive_minimum,
                                                                 spec.maximum, spec.exclusive_maximum)):
        ok = not (isinstance(value, float) and math.isnan(value))
        ok = ok and (spec.minimum is None or value >= spec.minimum)
        ok = ok and (spec.exclusive_minimum is None or value > spec.exclusive_minimum)
        ok = ok and (spec.maximum is None or value <= spec.maximum)
        ok = ok and (spec.exclusive_maximum is None or value < spec.exclusive_maximum)
        if kind == "float" and value is not None and math.isinf(value):
            ok = False
        if not ok:
            raise DistillError(f"{label} must be {_bounds_text(spec)}, got {value!r}")


def validate(obj, name: Namer | None = None):
    """Check every declared field of `obj`, then its cross-field rules (`obj.check(name)`); returns obj.

    Every failure is one DistillError line naming the option as `name` spells it (default: the CLI
    flag). None skips a field's checks: it means "not set" (automatic, or filled in later).
    """
    name = name or cli_names(type(obj))
    for d in declared(obj):
        value = getattr(obj, d.name)
        if value is not None:
            _check_value(d, value, name(d.name))
    check = getattr(obj, "check", None)
    if callable(check):
        check(name)
    return obj


# ------------------------------------------------------------------------------------------ config files


def _type_text(tp) -> str:
    return {"list": "a list of strings", "dict": "a table of strings", "path": "str"}.get(_kind(tp), _kind(tp))


def _coerce(key: str, value, tp, base_dir: Path | None, auto: bool = False):
    """One TOML value checked against the field's type; ints are accepted where floats are expected
    (and the word "auto" where the field is declared `auto`)."""
    kind = _kind(tp)
    if auto and value == AUTO:
        return value
    bad = DistillError(f"config key '{key}' must be {_type_text(tp)}, got {type(value).__name__} {value!r}")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "path":
        if value == "" and _optional(tp)[1]:
            return None  # "" was how older configs wrote "no path"
        if not isinstance(value, str) or not value:
            raise DistillError(f"config key '{key}' must be a path, got {type(value).__name__} {value!r}")
        path = Path(value).expanduser()
        return (base_dir / path).resolve() if base_dir is not None and not path.is_absolute() else path
    if kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return dict(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_assignments(value, keys=None, flag=f"config key '{key}'")
    raise bad


def config_keys(cls, exclude: Iterable[str] = ()) -> list[str]:
    exclude = set(exclude)
    return [d.name for d in declared(cls) if d.spec.in_config and d.name not in exclude]


def settings_from_table(cls, table: Mapping[str, Any], section: str, *, base_dir: Path | None = None,
                        exclude: Iterable[str] = (), into=None):
    """`cls` (or `into`, updated) from a TOML table, validated with config names (`section.key`).

    Keys in `exclude` (the ones the pipeline fills in) and fields declared `in_config=False` are
    unknown keys here; an unknown key or a wrong type is one DistillError line naming it.
    """
    if not isinstance(table, Mapping):
        raise DistillError(f"config entry '{section}' must be a [section] table")
    obj = into if into is not None else blank(cls)
    known = {d.name: d for d in declared(cls) if d.name in config_keys(cls, exclude)}
    for key, value in table.items():
        full = f"{section}.{key}"
        if key not in known:
            raise DistillError(f"unknown config key '{full}'; [{section}] takes: {', '.join(sorted(known))}")
        setattr(obj, key, _coerce(full, value, known[key].type, base_dir, known[key].spec.auto))
    return validate(obj, config_names(section))


def section_values(obj, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The config-reachable values of `obj` as plain JSON-able data (paths as strings)."""
    keys = config_keys(type(obj), exclude)
    return {k: _plain(getattr(obj, k)) for k in keys}


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def plain_dict(obj) -> dict[str, Any]:
    """Every field of `obj` as JSON-able data (paths as strings)."""
    return {d.name: _plain(getattr(obj, d.name)) for d in declared(obj)}


# ------------------------------------------------------------------------------------------ command line


def typer_parameters(cls, exclude: Iterable[str] = ()) -> list[inspect.Parameter]:
    """The typer parameters of `cls`'s CLI fields, in declaration order (arguments first)."""
    import typer

    exclude = set(exclude)
    params = []
    for d in declared(cls):
        if not d.spec.cli or d.name in exclude:
            continue
        kind, (inner, optional) = _kind(d.type), _optional(d.type)
        help_text = d.spec.help
        if d.spec.choices is not None:
            help_text += (" FIELD one of: " if kind == "dict" else " One of: ") + ", ".join(map(str, d.spec.choices)) + "."
        default = ... if d.required else d.default
        if kind == "list" and d.spec.sep:
            annotation = Optional[str]
            default = ... if d.required else (d.spec.sep.join(default) if default else None)
        elif kind == "list":
            annotation = Optional[typing.List[str]]
            default = ... if d.required else (list(default) if default else None)
        elif kind == "dict":
            annotation = Optional[typing.List[str]]
            default = ... if d.required else ([f"{k}={v}" for k, v in default.items()] if default else None)
        elif kind == "path":
            annotation = Optional[Path] if optional else Path
        elif d.spec.auto:
            annotation = Optional[str]
            default = ... if d.required else (None if default is None else str(default))
        else:
            annotation = Optional[inner] if optional else inner
        if d.spec.argument:
            info = typer.Argument(default, help=help_text, show_default=not d.required)
        else:
            decls = [cli_flag(d)]
            if kind == "bool" and not d.spec.flag:
                decls = [f"{cli_flag(d)}/--no-{cli_flag(d)[2:]}"]
            if d.spec.short:
                decls.append(d.spec.short)
            info = typer.Option(default, *decls, help=help_text, metavar=d.spec.metavar)
        params.append((d.spec.argument, inspect.Parameter(d.name, inspect.Parameter.KEYWORD_ONLY,
                                                          default=info, annotation=annotation)))
    return [p for _, p in sorted(params, key=lambda item: not item[0])]


def from_cli(cls, values: Mapping[str, Any], **fixed):
    """An instance of `cls` from typer's parsed values (lists and NAME=VALUE maps converted), validated."""
    kwargs = dict(fixed)
    names = cli_names(cls)
    for d in declared(cls):
        if d.name not in values:
            continue
        value, kind = values[d.name], _kind(d.type)
        if kind == "list" and d.spec.sep and isinstance(value, str):
            value = [v.strip() for v in value.split(d.spec.sep) if v.strip()] or None
        elif kind == "list":
            value = list(value) if value else (None if _optional(d.type)[1] else [])
        elif kind == "dict":
            value = parse_assignments(value, keys=d.spec.choices, flag=names(d.name)) or (
                None if _optional(d.type)[1] else {})
        elif d.spec.auto and isinstance(value, str) and value != AUTO:
            try:
                value = int(value) if kind == "int" else float(value)
            except ValueError:
                raise DistillError(f"{names(d.name)} must be a number of tokens or {AUTO}, got {value!r}") from None
        kwargs[d.name] = value
    return validate(cls(**kwargs))


def typer_command(cls, run: Callable[[Any], Any], *, exclude: Iterable[str] = (), **fixed) -> Callable:
    """A typer callback whose options are `cls`'s CLI fields; it builds and validates an instance
    (`fixed` values for the excluded fields) and calls `run(instance)`. The help text is `run`'s docstring."""
    params = typer_parameters(cls, exclude)

    def command(**values):
        return run(from_cli(cls, values, **fixed))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = run.__doc__
    command.__name__ = getattr(run, "__name__", cls.__name__)
    return command
