"""The one way configuration is read: plain YAML/JSON data (and `key=value` overrides) checked against
nested dataclasses by jsonargparse, the parser that also drives the training CLI.

Every user mistake becomes one `ConfigError` line naming the dotted key (e.g.
`data.filter.min_score: expected float, got 'x'`), so a typo stops a run before any work starts.
After jsonargparse has built the dataclasses, each one's optional `check(path)` method runs (children
first) for the rules a type cannot say (ranges, cross-field constraints).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import ArgumentError, ArgumentParser

T = TypeVar("T")
_ROOT = "root"  # the one argument of the internal parser; error keys are rewritten to the caller's path


class ConfigError(ValueError):
    """Configuration that does not match its schema; the message is one line naming the key."""


def parse(cls: type[T], data: Any, path: str, overrides: Sequence[tuple[str, str]] = ()) -> T:
    """`data` as a `cls`, with `overrides` (a dotted key below `path`, and a YAML value) applied on top."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    _check_mappings(cls, data, path)
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)  # a key prefix is a typo, not a key
    parser.add_argument(f"--{_ROOT}", type=cls, required=True)
    try:
        namespace = parser.parse_object({_ROOT: data})
        if overrides:
            namespace = parser.parse_args([f"--{_ROOT}.{key}={value}" for key, value in overrides], namespace)
        obj = getattr(parser.instantiate(namespace), _ROOT)
    except (ArgumentError, ValueError, TypeError) as err:  # how jsonargparse reports a value that does not fit
        raise ConfigError(_one_line(str(err), cls, path)) from None
    _run_checks(obj, path)
    return obj


def read_section(params_path: str | Path, dotted: str) -> Any:
    """The `dotted` section (e.g. `train.eval`) of a YAML params file; missing sections are None."""
    try:
        with open(params_path) as f:
            node = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"--params: {params_path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"--params: {params_path} is not valid YAML ({' '.join(str(err).split())})") from err
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass in a field's type (`X` or `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _check_mappings(cls: type, data: dict, path: str) -> None:
    # jsonargparse accepts a scalar where a nested dataclass goes and fails only when it builds the
    # object, with a message that names no key: this names it first.
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        inner = _dataclass_of(hints[name]) if name in hints else None
        if inner is None or value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{path}.{name}: expected a mapping, got {type(value).__name__}")
        _check_mappings(inner, value, f"{path}.{name}")


def _allows_none(tp: Any) -> bool:
    return tp is Any or (typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp))


def _run_checks(obj: Any, path: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and not _allows_none(hints[f.name]):  # jsonargparse lets a null through
            tp = hints[f.name]
            raise ConfigError(f"{path}.{f.name}: expected {tp.__name__ if isinstance(tp, type) else tp}, got None")
        if dataclasses.is_dataclass(value):
            _run_checks(value, f"{path}.{f.name}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _run_checks(item, f"{path}.{f.name}[{i}]")
    check = getattr(obj, "check", None)
    if callable(check):
        check(path)


def _allowed(cls: type, key: str) -> str:
    """The field names of the dataclass at dotted `key` below `cls` (for 'unknown key' messages)."""
    for name in [k for k in key.split(".") if k][:-1]:
        hints = typing.get_type_hints(cls)
        inner = _dataclass_of(hints.get(name))
        if inner is None:
            return ""
        cls = inner
    return f" (allowed: {', '.join(sorted(f.name for f in dataclasses.fields(cls) if f.init))})"


def _join(key: str, name: str) -> str:
    if name == _ROOT or name.startswith(f"{_ROOT}."):
        return name  # jsonargparse names keys of the root parser in full, those of nested parsers relative
    return f"{key}.{name}" if key else name


def _type_name(text: str) -> str:
    found = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text)
    return found[1] if found else text


def _one_line(message: str, cls: type, path: str) -> str:
    """jsonargparse's (multi-line, nested) message as `path.key: what`."""
    key, expected, problem = _ROOT, None, None
    for line in (raw.strip().lstrip("- ") for raw in message.splitlines()):
        if found := re.match(r'Parser key "([^"]+)"', line):
            key = _join(key, found[1])
        elif found := re.match(r"Group '([^']+)' does not accept option '([^']+)'", line):
            key, problem = _join(_join(key, found[1]), found[2]), "unknown key"
        elif found := re.match(r"Option '([^']+)' is not accepted", line):
            key, problem = _join(key, found[1]), "unknown key"
        elif found := re.match(r"unrecognized arguments: --(\S+?)(?:=|\s|$)", line):
            key, problem = found[1], "unknown key"
        elif found := re.match(r"the following arguments are required: ([^,\s]+)", line):
            key, problem = _join(key, found[1]), "required key is missing"
        elif found := re.match(r"argument --(\S+): (.*)", line):
            key, problem = found[1], found[2]
        elif found := re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", line):
            problem = f"{found[2]!r} is not one of [{found[1]}]"
        elif found := re.match(r"Expected a .+?\. Got value: NestedArg\(key='([^']+)'", line):
            problem = f"not a mapping, cannot set {path}{key[len(_ROOT):]}.{found[1]}"  # an override went too deep
        elif found := re.match(r"Expected a (.+?)\. Got value: (.*)", line):
            problem = f"expected {_type_name(found[1])}, got {found[2]!r}"
        elif found := re.match(r"Not of type (\w+): (\S+) does not conform to restriction (.*)", line):
            problem = f"expected {found[1]} ({found[3]}), got {found[2]!r}"  # jsonargparse.typing's PositiveInt etc.
        elif found := re.match(r"Not of type (\w+): does not conform to restriction (.*)", line):
            expected = expected or f"{found[1]} ({found[2]})"  # the same inside an `X | None`
        elif found := re.match(r"Not of type (\w+): (.*)", line):
            problem = f"expected {found[1]} ({found[2]})"
        elif found := re.match(r"Expected a (.+)$", line):
            if "NoneType" not in found[1] and expected is None:
                expected = _type_name(found[1])  # the non-null member of an `X | None`
        elif expected and (found := re.match(r"Given value: (.*)", line)):
            problem = f"expected {expected}, got {found[1]!r}"
        if problem:
            break
    dotted = path + key[len(_ROOT):]
    if problem == "unknown key":
        problem += _allowed(cls, key[len(_ROOT):])
    return f"{dotted}: {problem or ' '.join(message.split())}"
