"""Options declared once: a dataclass field carries its default, help text, flags and choices; the
CLI options, the checks of a choice, and the loose-value parsing of recipes all come from it.

    @dataclass(frozen=True)
    class Layout:
        mode: str = option("split", "How layers become sections.", choices=("split", "shared"))

    @app.command()
    @options_from(Layout, into="layout")   # adds --mode (help ends with "[default: split]")
    def convert(src: str, layout: Layout): ...
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import List, Optional

from .errors import StagError


def option(default, help: str, *, flags: tuple = (), choices: tuple = (), default_text: str | None = None,
           cli: bool = True, kind=None):
    """A dataclass field that is also a CLI option. `kind`: the type the CLI parses (default: the
    field's annotation); `default_text`: what --help shows when the default is computed later."""
    meta = dict(help=help, flags=tuple(flags), choices=tuple(choices), default_text=default_text, cli=cli, kind=kind)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_choices(instance, flag_of=lambda name: "--" + name.replace("_", "-")):
    """StagError naming the option when a field with `choices` holds anything else."""
    for f in dataclasses.fields(instance):
        choices = f.metadata.get("choices")
        value = getattr(instance, f.name)
        if choices and value is not None and value not in choices:
            raise StagError(f"{flag_of(f.name)} must be one of {', '.join(map(str, choices))}, not '{value}'")


def coerce(name: str, kind, value):
    """A loose value (YAML, JSON, CLI text) as the field's type: '1e-3' -> 0.001, 2e6 -> 2000000."""
    if value is None:
        return None
    origin = typing.get_origin(kind)
    if origin is typing.Union:  # Optional[X]
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind)
    try:
        if kind is list or origin in (list, List):
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        if kind is bool:
            return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else bool(value)
        if kind is int:
            as_float = float(value)  # accepts 2e6 and 20_000_000 from YAML
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise StagError(f"option {name}: cannot read {value!r} as {getattr(kind, '__name__', kind)}") from None


def from_dict(cls, values: dict, where: str = "options", what: str = "option"):
    """An instance of the dataclass from loose values; unknown keys are an error that lists the known."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise StagError(f"unknown {what}(s) in {where}: {', '.join(unknown)}; known: {', '.join(names)}")
    return cls(**{k: coerce(k, hints[k], v) for k, v in values.items()})


def _escape(text: str) -> str:
    """Rich reads [...] as markup and would swallow it from --help texts."""
    return text.replace("[", r"\[")


def options_from(cls, into: str, optional: bool = False, skip: tuple = ()):
    """Decorator: add every CLI field of dataclass `cls` to a Typer command as an option, and pass the
    command `into=` either an instance (optional=False: CLI defaults are the field defaults) or, with
    optional=True, a dict of only the options given on the command line (defaults then live in the
    dataclass, and --help says what they are)."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in skip]

    def decorate(command):
        import typer
        signature = inspect.signature(command)
        resolved = typing.get_type_hints(command)  # the command's own annotations, as real types
        params = [p.replace(annotation=resolved.get(name, p.annotation))
                  for name, p in signature.parameters.items() if name != into]
        for f in fields:
            kind = f.metadata.get("kind") or hints[f.name]
            if typing.get_origin(kind) is typing.Union:
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            if kind is list:
                kind = List[str]
            default = _default(f)
            text = f.metadata["help"]
            if f.metadata.get("choices"):
                text += f" One of: {', '.join(map(str, f.metadata['choices']))}."
            shown = f.metadata.get("default_text") or (None if default in (None, []) else str(default))
            if optional and shown is not None:
                text += f" [default: {shown}]"
            flags = f.metadata.get("flags") or ()
            name = "--" + f.name.replace("_", "-")
            if kind is bool and not flags:
                flags = (f"{name}/--no-{name[2:]}",)
            flags = flags or (name,)
            params.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind] if optional else kind,
                default=typer.Option(None if optional else default, *flags, help=_escape(text),
                                     show_default=not optional and shown is not None)))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            given = {f.name: kwargs.pop(f.name) for f in fields if f.name in kwargs}
            if optional:
                given = {k: v for k, v in given.items() if v not in (None, [])}
                return command(*args, **{into: given}, **kwargs)
            return command(*args, **{into: cls(**given)}, **kwargs)

        params.sort(key=lambda p: p.kind == inspect.Parameter.KEYWORD_ONLY)
        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}  # Typer reads these too
        return wrapper
    return decorate
