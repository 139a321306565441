"""Strict checks of parsed YAML against frozen dataclasses: the recipe's shape.

A dataclass's type hints are its schema: `str`, `bool`, `int`, `Any`, `list[T]`, `dict[str, T]`,
unions such as `str | None`, and nested dataclasses. Nothing is coerced (`model: 7` is not the
string "7", `force: 1` is not true) and a key the dataclass lacks is an error, as with mergekit's
pydantic models run strictly. A field may name a check of its own (`field(metadata={CHECK: f})`,
f returning a message or None).

Every problem is reported, not only the first, with its path in the data. The result is still
built where the data allows, so the rest of a recipe can be checked in the same run: a faulty
optional key is left out (its default is used), a faulty entry of a `dict[str, T]` is dropped.
A fault at a required key, or anywhere in a list's items, makes the result `None`: a list with
an item missing would shift the items after it, and `models` without one model is another
merge.

Written for the recipe (a few dozen values): with pydantic, importing and building the schema
took a third of a second of every run's start.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar, Union

CHECK = "check"  # dataclass field metadata key: a function value -> message or None

Path = tuple[str | int, ...]
T = TypeVar("T")


@dataclass(frozen=True)
class Fault:
    """One problem: where (`path`), what kind (`missing`, `unknown_key` or `invalid`) and, for
    `invalid`, why."""

    path: Path
    kind: str
    message: str = ""


class _Invalid:
    """The value of a check that failed."""


_INVALID = _Invalid()  # left out where the key is optional
_LOST = _Invalid()  # the whole result is lost (a list item, or a required key's value)


def check(data: Any, schema: type[T]) -> tuple[T | None, list[Fault]]:
    """`data` as an instance of the dataclass `schema`, and every fault found on the way.

    >>> @dataclass(frozen=True)
    ... class Model:
    ...     model: str
    ...     weight: float | None = None
    >>> check({"model": "a", "weight": 0.5}, Model)
    (Model(model='a', weight=0.5), [])
    >>> check({"model": "a", "wieght": 0.5}, Model)
    (Model(model='a', weight=None), [Fault(path=('wieght',), kind='unknown_key', message='')])
    >>> check({"weight": 0.5}, Model)
    (None, [Fault(path=('model',), kind='missing', message='')])
    """
    faults: list[Fault] = []
    value = _check(data, schema, (), faults)
    return (None if isinstance(value, _Invalid) else value), faults


def field_names(schema: type) -> list[str]:
    """The keys a dataclass schema accepts, in declaration order."""
    return [f.name for f in dataclasses.fields(schema)]


def _check(value: Any, hint: Any, path: Path, faults: list[Fault]) -> Any:
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _check_dataclass(value, hint, path, faults)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return _check_union(value, typing.get_args(hint), path, faults)
    if origin is list:
        return _check_list(value, typing.get_args(hint)[0], path, faults)
    if origin is dict:
        return _check_dict(value, typing.get_args(hint)[1], path, faults)
    if _is_instance(value, hint):
        return value
    faults.append(Fault(path, "invalid", f"expected {_describe(hint)}"))
    return _INVALID


def _is_instance(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is no count
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_union(value: Any, options: tuple[Any, ...], path: Path, faults: list[Fault]) -> Any:
    if value is None:
        if type(None) in options:
            return None
    else:
        for option in options:
            if option is type(None):
                continue
            # A member that does not fit says nothing about the others: try each quietly, and
            # report the first whose kind of value (a mapping, a list) this one is.
            attempt: list[Fault] = []
            checked = _check(value, option, path, attempt)
            if not attempt:
                return checked
            if _same_kind(value, option):
                faults.extend(attempt)
                return checked
    shown = " or ".join(_describe(o) for o in options if o is not type(None))
    faults.append(Fault(path, "invalid", f"expected {shown}"))
    return _INVALID


def _same_kind(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    return False


def _check_list(value: Any, item: Any, path: Path, faults: list[Fault]) -> Any:
    if not isinstance(value, list):
        faults.append(Fault(path, "invalid", "expected a list"))
        return _INVALID
    items = [_check(v, item, (*path, i), faults) for i, v in enumerate(value)]
    return _LOST if any(isinstance(v, _Invalid) for v in items) else items


def _check_dict(value: Any, item: Any, path: Path, faults: list[Fault]) -> Any:
    if not isinstance(value, dict):
        faults.append(Fault(path, "invalid", "expected a mapping"))
        return _INVALID
    out = {}
    lost = False
    for key, v in value.items():
        if not isinstance(key, str):
            faults.append(Fault((*path, key), "invalid", "a key here must be a string"))
            continue
        checked = _check(v, item, (*path, key), faults)
        lost = lost or checked is _LOST
        if not isinstance(checked, _Invalid):
            out[key] = checked
    return _LOST if lost else out


def _check_dataclass(value: Any, schema: type, path: Path, faults: list[Fault]) -> Any:
    if not isinstance(value, dict):
        faults.append(Fault(path, "invalid", "expected a mapping of keys"))
        return _INVALID
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = _hints(schema)
    for key in value:
        if key not in fields:
            faults.append(Fault((*path, key), "unknown_key"))
    given: dict[str, Any] = {}
    lost = False
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in value:
            if required:
                faults.append(Fault((*path, name), "missing"))
                lost = True
            continue
        checked = _check(value[name], hints[name], (*path, name), faults)
        own_check: Callable[[Any], str | None] | None = f.metadata.get(CHECK)
        if not isinstance(checked, _Invalid) and checked is not None and own_check is not None:
            message = own_check(checked)
            if message:
                faults.append(Fault((*path, name), "invalid", message))
                checked = _INVALID
        if not isinstance(checked, _Invalid):
            given[name] = checked
        lost = lost or checked is _LOST or (required and checked is _INVALID)
    return _LOST if lost else schema(**given)


@cache
def _hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _describe(hint: Any) -> str:
    """What a value of this type looks like, for messages."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) or origin is dict:
        return "a mapping"
    if origin is list:
        return "a list"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(o) for o in typing.get_args(hint) if o is not type(None))
    return {
        str: "a string",
        bool: "true or false",
        int: "a whole number",
        float: "a number",
    }.get(hint, getattr(hint, "__name__", str(hint)))
