"""The configuration's type checker: a plain YAML value converted into a frozen dataclass, every problem named.

Generic over the dataclasses in `sections` (it never imports them): a field's type hint says
what is allowed, its metadata the bounds (`ge`, `gt`, `le`, `lt`, `min_len`, `pattern`,
`path_like`, `keywords`). Each problem names where the value came from (the file or the
command line), the dotted key, the value and what is allowed; a typo gets the closest key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from metal_defect.errors import ConfigError


def parse_section(cls: type, value: Any, key: str) -> Any:
    """Validate a plain value (e.g. a section written with `to_plain`) into `cls`; ConfigError lists the problems."""
    problems: list[str] = []
    result = convert(value, cls, key, {}, {}, Path("."), problems)
    if problems:
        raise ConfigError(f"invalid {key}: " + "; ".join(problems))
    return result


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a user may set, e.g. 'base.seed', 'data_loader.augmentation.rotate90'."""
    keys = []
    for name, tp in field_types(cls).items():
        if is_internal(cls, name):
            continue
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        last = key.rsplit(".", 1)[-1]
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        near = difflib.get_close_matches(last, list(tails), n=1, cutoff=0.75)
        close = [tails[near[0]]] if near else []
    return f"; did you mean '{close[0]}'?" if close else ""


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_internal(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("internal") for f in dataclasses.fields(cls))


def _origin_of(key: str, origins: dict[str, str], within: bool = False) -> str:
    """Which file (or the command line) a key's value came from. With `within`, a value that
    is a whole section counts as from the command line when any key inside it was overridden."""
    if within and any(k.startswith(key + ".") and v == "command line" for k, v in origins.items()):
        return f"command line (over {_origin_of(key, origins)})"
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        label = origins.get(".".join(parts[:i]))
        if label:
            return label
    return "config"


def _describe(tp: Any, meta: dict[str, Any]) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a, meta) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a section with keys " + ", ".join(all_keys(tp))
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0], {}).removeprefix("an ").removeprefix("a ") + " items"
    if origin is dict:
        return f"a mapping of names to {_describe(typing.get_args(tp)[1], {})}"
    base = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))
    bounds = [f"{sym} {meta[k]}" for k, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in meta]
    return base + (" " + " and ".join(bounds) if bounds else "")


class _Mismatch(Exception):
    """The value is not of this type (used to try the arms of a Union)."""


def convert(value: Any, tp: Any, key: str, meta: dict[str, Any], origins: dict[str, str], base_dir: Path, problems: list[str]) -> Any:
    where = f"{_origin_of(key, origins)}: {key}"
    try:
        return _convert_strict(value, tp, key, meta, origins, base_dir, problems)
    except _Mismatch:
        problems.append(f"{where} = {value!r} is not valid; expected {_describe(tp, meta)}")
        return None


def _convert_strict(value: Any, tp: Any, key: str, meta: dict[str, Any], origins: dict[str, str], base_dir: Path, problems: list[str]) -> Any:
    """`value` as type `tp`: problems are appended, a value of another type raises _Mismatch. One branch per
    kind of type, in one function on purpose: it reads as the table of what each type accepts."""
    origin = typing.get_origin(tp)
    where = f"{_origin_of(key, origins)}: {key}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where} = {value!r} is not valid; expected a section with keys {', '.join(all_keys(tp))}")
            return None
        kwargs = {}
        types_ = field_types(tp)
        allowed = [f.name for f in dataclasses.fields(tp) if not f.metadata.get("internal")]
        for name in value:
            if name not in allowed:
                full = [f"{key}.{k}" for k in allowed]
                problems.append(f"{_origin_of(f'{key}.{name}', origins)}: unknown key '{key}.{name}'{suggest(f'{key}.{name}', full)}")
        for f in dataclasses.fields(tp):
            if f.metadata.get("internal"):
                continue
            if f.name not in value:
                problems.append(f"{where}: missing key '{key}.{f.name}' ({_describe(types_[f.name], dict(f.metadata))})")
                continue
            kwargs[f.name] = convert(value[f.name], types_[f.name], f"{key}.{f.name}", dict(f.metadata), origins, base_dir, problems)
        if len(kwargs) != len(allowed) or any(v is None and not _allows_none(types_[k]) for k, v in kwargs.items()):
            return None
        obj = tp(**kwargs)
        if hasattr(obj, "check"):
            problems.extend(f"{_origin_of(key, origins, within=True)}: {p}" for p in obj.check(key))
        return obj
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            if typing.get_origin(arm) is Literal and value not in typing.get_args(arm):
                continue  # e.g. 'big' for `int | Literal["auto"]`: report the whole union, not just the literal
            if dataclasses.is_dataclass(arm) and not isinstance(value, dict):
                continue  # e.g. 0.5 for `list[float] | RangeParam | None`: the union is reported whole
            trial: list[str] = []
            try:
                result = _convert_strict(value, arm, key, meta, origins, base_dir, trial)
            except _Mismatch:
                continue
            problems.extend(trial)
            return result
        raise _Mismatch
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{where} = {value!r} is not allowed; expected {_describe(tp, meta)}{hint}")
        return value
    if tp is type(None):
        if value is not None:
            raise _Mismatch
        return None
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp)
        items = [convert(v, item_tp, f"{key}[{i}]", {}, origins, base_dir, problems) for i, v in enumerate(value)]
        if len(items) < meta.get("min_len", 0):
            problems.append(f"{where} = {value!r} is too short; expected at least {meta['min_len']} items")
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        _, val_tp = typing.get_args(tp)
        return {str(k): convert(v, val_tp, f"{key}.{k}", {}, origins, base_dir, problems) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return _check_range(value, meta, where, problems)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return _check_range(float(value), meta, where, problems)
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        pattern = meta.get("pattern")
        if pattern and not re.match(pattern, value):
            problems.append(f"{where} = {value!r} does not match {pattern}")
        if meta.get("path_like") and "://" not in value and value not in meta.get("keywords", ()):
            return str(_resolve(value, base_dir))
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise _Mismatch
        return _resolve(value, base_dir)
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in the spec, not user input


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base_dir / path).resolve()


def _check_range(value: float, meta: dict[str, Any], where: str, problems: list[str]) -> Any:
    checks = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"), ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for name, ok, sym in checks:
        if name in meta and not ok(value, meta[name]):
            problems.append(f"{where} = {value!r} is out of range; expected {sym} {meta[name]}")
    return value
