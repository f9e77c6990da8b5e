"""The one place that reads command-line flags and PS_* environment variables.

Each CLI declares its settings as a frozen dataclass; `parse_config` turns
every field into a flag (`--field-name`) and an environment variable
(`PS_FIELD_NAME`). Precedence: flag, then environment, then the dataclass
default. A field holding another dataclass contributes that dataclass's
fields, so option groups can be shared between CLIs.

Flags are for operators. A tuning knob (`setting(..., tuning=True)`) is a
config field and an environment variable; its flag is still accepted but
not shown by --help. docs/configuration.md lists every setting, generated
from these dataclasses by scripts/gen_config_docs.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "Setting",
    "cli_args",
    "config_from_env",
    "env_name",
    "env_names",
    "flag_name",
    "parse_config",
    "setting",
    "settings_of",
]

ENV_PREFIX = "PS_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

T = TypeVar("T")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _scalar_type(annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    """The Python type of a field, and its choices if it is a Literal."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0]), tuple(args)
    if args:  # Optional[X] / X | None
        non_none = [a for a in args if a is not type(None)]
        return _scalar_type(non_none[0])
    return annotation, None


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """Leaf fields of a config dataclass, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            leaves.extend(_fields(typing.cast(type, hint)))
        else:
            leaves.append((field, hint))
    return leaves


def env_names(cls: type) -> set[str]:
    """Every PS_* variable that configures `cls`."""
    return {env_name(field.name) for field, _ in _fields(cls)}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One leaf field of a config dataclass, as the reference documents it."""

    name: str
    type: str
    default: Any
    help: str
    tuning: bool

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    @property
    def env(self) -> str:
        return env_name(self.name)


def settings_of(cls: type) -> list[Setting]:
    """The settings of `cls`, nested dataclasses' included, in declaration order."""
    result = []
    for field, hint in _fields(cls):
        kind, choices = _scalar_type(hint)
        type_name = " | ".join(map(str, choices)) if choices else kind.__name__
        if field.default is None:
            type_name += " (optional)"
        result.append(
            Setting(field.name, type_name, field.default, field.metadata.get("help", ""),
                    field.metadata.get("tuning", False))
        )  # fmt: skip
    return result


def build_parser(cls: type, description: str, env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser for `cls`, with defaults taken from the environment."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Tuning settings are PS_* environment variables: see docs/configuration.md.",
    )
    for field, hint in _fields(cls):
        kind, choices = _scalar_type(hint)
        variable = env_name(field.name)
        try:
            default = _env_value(field, hint, env)
        except ValueError as exc:
            parser.error(str(exc))
        help_text = (
            argparse.SUPPRESS if field.metadata.get("tuning") else f"{field.metadata.get('help', '')} [env {variable}]"
        )
        if kind is bool:
            parser.add_argument(
                flag_name(field.name), action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag_name(field.name), type=kind, choices=choices, default=default, help=help_text)
    return parser


def _env_value(field: dataclasses.Field[Any], hint: Any, env: Mapping[str, str]) -> Any:
    """The field's value from its PS_* variable in `env`, else its default."""
    variable = env_name(field.name)
    if variable not in env:
        return field.default
    kind, choices = _scalar_type(hint)
    text = env[variable]
    try:
        value = _parse_bool(text) if kind is bool else kind(text)
    except ValueError as exc:
        raise ValueError(f"environment variable {variable}={text!r}: {exc}") from None
    if choices is not None and value not in choices:
        raise ValueError(f"environment variable {variable}={text!r}: not one of {list(choices)}")
    return value


def config_from_env(cls: type[T], env: Mapping[str, str] | None = None) -> T:
    """Build `cls` from PS_* environment variables over defaults, as a library
    does where there is no command line (ValueError for a bad value)."""
    env = os.environ if env is None else env
    return _construct(cls, {field.name: _env_value(field, hint, env) for field, hint in _fields(cls)})


def _construct(cls: type[T], values: Mapping[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[field.name]
        nested = dataclasses.is_dataclass(hint)
        kwargs[field.name] = _construct(typing.cast(type, hint), values) if nested else values[field.name]
    return cls(**kwargs)


def parse_config(
    cls: type[T], description: str, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> T:
    """Build `cls` from flags over environment over defaults."""
    namespace = build_parser(cls, description, env).parse_args(argv)
    return _construct(cls, vars(namespace))


def setting(default: Any, help: str, tuning: bool = False) -> Any:
    """A config field with its help text (shown by --help, unless a `tuning` knob)."""
    return dataclasses.field(default=default, metadata={"help": help, "tuning": tuning})


def cli_args(config: Any) -> list[str]:
    """The flags that reproduce `config` on another process's command line."""
    args: list[str] = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            args += cli_args(value)
        elif isinstance(value, bool):
            args.append(flag_name(field.name) if value else "--no-" + field.name.replace("_", "-"))
        elif value is not None:
            args += [flag_name(field.name), str(value)]
    return args
