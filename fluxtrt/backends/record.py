"""What a backend records about an engine it built: a typed record per backend, read from and written to the
manifest's JSON by one pair of functions."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

RecordT = TypeVar("RecordT", bound="BackendRecord")


@dataclass
class BackendRecord:
    """What a backend recorded when it built one engine (versions, GPU, kernels chosen, counts).

    Subclasses declare the keys they know as fields, each with a default (None: not recorded). A key no field
    declares (written by another fluxtrt version, or a backend without its own record) is kept in ``extra``, readable
    there and written back unchanged.
    """

    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls: type[RecordT], raw: Mapping[str, Any]) -> RecordT:
        """The record as ``to_json`` (or an older fluxtrt) wrote it: declared keys typed (a list as a tuple field, a
        string as an int field), the rest in ``extra``."""
        hints = typing.get_type_hints(cls)
        known = {f.name: hints[f.name] for f in fields(cls) if f.name != "extra"}
        values = {k: _typed(kind, raw[k]) for k, kind in known.items() if k in raw}
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        """JSON-able: the declared keys that are recorded (not None), tuples as lists, then ``extra``."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self._declared() if v is not None}
        return {**out, **self.extra}

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every recorded key and value, as ``to_json`` writes them (for tables)."""
        return iter(self.to_json().items())

    def _declared(self) -> Iterator[tuple[str, Any]]:
        return ((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "extra")


def _typed(kind: Any, value: Any) -> Any:
    """``value`` read from JSON as ``kind`` (``X | None`` as X)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (types.UnionType, typing.Union) and len(args) == 1:
        kind = args[0]
    if value is None:
        return None
    if kind is int and isinstance(value, str):
        return int(value)
    if typing.get_origin(kind) is tuple:
        return tuple(value)
    return value


def as_record(cls: type[RecordT], record: BackendRecord) -> RecordT:
    """``record`` as a ``cls`` (one read as another record class is read again from its JSON)."""
    return record if isinstance(record, cls) else cls.from_json(record.to_json())
