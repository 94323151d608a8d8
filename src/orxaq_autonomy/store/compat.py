"""Structural compatibility between two JSON Schema versions of one subject (SPEC 9).

`backward`: the new version accepts what the earlier one accepted; `forward`: the earlier
one accepts what the new one accepts; `full`: both; `none`: nothing is checked. The rules
follow Confluent's JSON Schema checks, except that adding an optional property to an open
object is compatible (the registry proves separately that no stored event breaks).

One walk compares a *reader* with a *writer* schema and lists where the reader refuses
something the writer allows; the messages are worded in old/new terms a user thinks in.
Keywords the walk does not understand (`oneOf`, `if`, ...) are compared as whole values:
a change there is reported, never silently passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

MODES = ("backward", "forward", "full", "none")
_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
# Keywords the walk handles itself; every other keyword must be unchanged.
_HANDLED = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "title",
        "description",
        "examples",
        "default",
        "deprecated",
        "readOnly",
        "writeOnly",
        "type",
        "properties",
        "required",
        "additionalProperties",
        "enum",
        "const",
        "items",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "pattern",
        "format",
    }
)
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems")  # raising narrows
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems")  # lowering narrows


def incompatibilities(new: Any, old: Any, mode: str) -> list[str]:
    """Why `new` is not compatible with `old` under `mode` (empty: compatible)."""
    if mode not in MODES:
        raise ValueError(f"unknown compatibility mode {mode!r}")
    found: list[str] = []
    if mode in ("backward", "full"):
        found += _narrowings(new, old, "", new_reads=True)
    if mode in ("forward", "full"):
        found += _narrowings(old, new, "", new_reads=False)
    return list(dict.fromkeys(found))  # in order, each once


def _name(path: str) -> str:
    return f"'{path}'" if path else "the payload"


def _types(schema: dict[str, Any]) -> set[str] | None:
    """The JSON types a schema allows by its `type` (None: any)."""
    kind = schema.get("type")
    if kind is None:
        return None
    kinds = {kind} if isinstance(kind, str) else set(kind)
    if "number" in kinds:
        kinds.add("integer")  # every integer is a number
    return kinds


def _show_types(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "any")
    return kind if isinstance(kind, str) else "|".join(kind)


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return list(enum) if isinstance(enum, list) else None


def _closed(schema: dict[str, Any]) -> bool:
    return schema.get("additionalProperties") is False


def _narrowings(reader: Any, writer: Any, path: str, new_reads: bool) -> Iterator[str]:
    """Where `reader` refuses a payload that `writer` allows. `new_reads`: the reader is
    the new version (backward), else the earlier one (forward)."""
    if reader is True or reader == {}:
        return
    if writer is False:
        return
    if reader is False or not isinstance(reader, dict) or not isinstance(writer, dict):
        if reader != writer:
            yield f"{_name(path)} schema changed"
        return
    old, new = (writer, reader) if new_reads else (reader, writer)
    # Types: the reader must allow every type the writer allows.
    r_types, w_types = _types(reader), _types(writer)
    if r_types is not None and (w_types is None or not w_types <= r_types):
        yield f"{_name(path)} type changed from {_show_types(old)} to {_show_types(new)}"
    # Enumerations: every value the writer allows must stay.
    r_values, w_values = _values(reader), _values(writer)
    if r_values is not None:
        if w_values is None:
            yield (f"{_name(path)} enum added" if new_reads else f"{_name(path)} enum removed")
        else:
            for value in w_values:
                if value not in r_values:
                    what = f"enum value {value!r}"
                    where = f" of {_name(path)}" if path else ""
                    yield f"{what}{where} removed" if new_reads else f"{what}{where} added"
    # Bounds and string rules.
    for key in (*_LOWER_BOUNDS, *_UPPER_BOUNDS, "pattern", "format"):
        if key not in reader or writer.get(key) == reader[key]:
            continue
        w_value = writer.get(key)
        if w_value is not None and isinstance(w_value, int | float):
            looser = (
                (reader[key] <= w_value if key in _LOWER_BOUNDS else reader[key] >= w_value)
                if isinstance(reader[key], int | float)
                else False
            )
            if looser:
                continue
        yield (
            f"{_name(path)} {key} changed from {old.get(key, 'none')!r} to {new.get(key, 'none')!r}"
        ).replace("'none'", "none")
    # Objects.
    r_props: dict[str, Any] = reader.get("properties") or {}
    w_props: dict[str, Any] = writer.get("properties") or {}
    r_required = set(reader.get("required") or ())
    w_required = set(writer.get("required") or ())
    for name in sorted(r_required - w_required):
        where = _join(path, name)
        if new_reads:
            yield f"new required property '{where}'"
        else:
            yield f"required property '{where}' made optional or removed"
    if _closed(reader) and not _closed(writer):
        yield (
            f"{_name(path)} closed (additionalProperties: false)"
            if new_reads
            else f"{_name(path)} opened (additionalProperties no longer false)"
        )
    for name in sorted(w_props.keys() - r_props.keys()):
        if new_reads:
            yield f"property '{_join(path, name)}' removed"
        elif _closed(reader):
            yield f"new property '{_join(path, name)}' on an object earlier versions close"
    for name in sorted(r_props.keys() & w_props.keys()):
        yield from _narrowings(r_props[name], w_props[name], _join(path, name), new_reads)
    extra = reader.get("additionalProperties")
    if isinstance(extra, dict) and extra != writer.get("additionalProperties"):
        yield f"{_name(path)} additionalProperties changed"
    # Arrays.
    if "items" in reader:
        yield from _narrowings(reader["items"], writer.get("items", True), path + "[]", new_reads)
    # Everything else must be as it was.
    for key in sorted((reader.keys() | writer.keys()) - _HANDLED):
        if reader.get(key) != writer.get(key):
            yield f"{_name(path)} keyword {key!r} changed"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
