"""msgpack encoding of protocol messages.

A message encodes as a msgpack extension holding its type name and its fields in
declaration order; ``Decimal`` encodes as an extension holding its exact text, so money
never passes through a float.  Decoding accepts only the known message types and
raises :class:`~golem_dask.errors.ProtocolError` on anything else.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal, InvalidOperation
from enum import Enum
from types import MappingProxyType
from typing import Any

import msgpack

from golem_dask.errors import ProtocolError
from golem_dask.protocol.messages import MESSAGE_TYPES

_EXT_DECIMAL = 1
_EXT_MESSAGE = 2
_BY_NAME = {cls.__name__: cls for cls in MESSAGE_TYPES}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGE_TYPES}


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, MappingProxyType):
        return dict(obj)
    cls = type(obj)
    if cls in _FIELDS:
        body = [cls.__name__, [getattr(obj, name) for name in _FIELDS[cls]]]
        return msgpack.ExtType(_EXT_MESSAGE, _pack(body))
    raise TypeError(f"cannot encode {cls.__name__} on the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_DECIMAL:
        try:
            return Decimal(data.decode())
        except (InvalidOperation, UnicodeDecodeError) as e:
            raise ProtocolError("malformed decimal on the wire") from e
    if code == _EXT_MESSAGE:
        body = _unpack(data)
        if not (isinstance(body, list) and len(body) == 2 and isinstance(body[1], list)):
            raise ProtocolError("malformed message on the wire")
        name, values = body
        cls = _BY_NAME.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {name!r}")
        if len(values) != len(_FIELDS[cls]):
            raise ProtocolError(f"{name} has {len(values)} fields, expected {len(_FIELDS[cls])}")
        try:
            return cls(*values)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"malformed {name}: {e}") from e
    raise ProtocolError(f"unknown msgpack extension {code}")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True, datetime=False)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True)


def encode(message: Any) -> bytes:
    """Encode a protocol message (or plain data containing messages) to bytes.

    Examples
    --------
    >>> from golem_dask.protocol.messages import Rejection
    >>> decode(encode(Rejection("a1", "too expensive", 0)))
    Rejection(subject_id='a1', reason='too expensive', timestamp_ms=0)
    """
    try:
        return _pack(message)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode {type(message).__name__}: {e}") from e


def decode(data: bytes) -> Any:
    """Decode bytes made by :func:`encode`; anything malformed raises ``ProtocolError``."""
    try:
        return _unpack(data)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            RecursionError) as e:
        raise ProtocolError(f"malformed msgpack: {e}") from e
