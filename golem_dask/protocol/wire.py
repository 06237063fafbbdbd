"""msgpack encoding of protocol messages.

A message encodes as a msgpack extension holding its type name and its fields in
declaration order; ``Decimal`` encodes as an extension holding its exact text, so money
never passes through a float.  Decoding accepts only the known message types and
raises :class:`~golem_dask.errors.ProtocolError` on anything else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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


# -- signed envelopes and frames ------------------------------------------------------------

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
#: Signed digests start with this, so an envelope signature can never be a transaction's.
_DOMAIN = b"golem-dask envelope\x00"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One signed message on the wire: who says what, when, and the proof.

    ``sender`` is an Ethereum address and ``signature`` its 65-byte signature over
    :meth:`digest`; ``nonce`` and ``timestamp_ms`` let receivers refuse replays.
    """

    version: int
    kind: str
    sender: str
    nonce: str
    timestamp_ms: int
    body: bytes
    signature: bytes

    def digest(self) -> bytes:
        from eth_utils import keccak

        fields = [self.version, self.kind, self.sender, self.nonce, self.timestamp_ms, self.body]
        return bytes(keccak(_DOMAIN + msgpack.packb(fields, use_bin_type=True)))


def seal(wallet: Any, kind: str, payload: Any, *, now_ms: int | None = None) -> Envelope:
    """Encode ``payload`` and sign it with ``wallet`` as a message of ``kind``.

    Examples
    --------
    >>> from golem_dask.payment.wallet import Wallet
    >>> env = seal(Wallet.from_key("11" * 32), "ping", {"n": 1}, now_ms=0)
    >>> verify(env)
    {'n': 1}
    """
    import os
    import time

    stamp = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    unsigned = Envelope(PROTOCOL_VERSION, kind, wallet.address, os.urandom(16).hex(), stamp, encode(payload), b"")
    return dataclasses.replace(unsigned, signature=wallet.sign_message_hash(unsigned.digest()))


def _fields(envelope: Envelope) -> list[Any]:
    return [envelope.version, envelope.kind, envelope.sender, envelope.nonce, envelope.timestamp_ms,
            envelope.body, envelope.signature]


def verify(envelope: Envelope) -> Any:
    """The payload, if ``envelope.sender`` really signed it; ProtocolError otherwise."""
    if envelope.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {envelope.version} is not {PROTOCOL_VERSION}; upgrade golem-dask")
    signature = envelope.signature
    if len(signature) != 65:
        raise ProtocolError("bad signature: not 65 bytes")
    try:
        from eth_keys import keys

        v = signature[64]
        sig = keys.Signature(vrs=(v - 27 if v >= 27 else v, int.from_bytes(signature[:32], "big"),
                                  int.from_bytes(signature[32:64], "big")))
        signer = sig.recover_public_key_from_msg_hash(envelope.digest()).to_checksum_address()
    except Exception as e:  # eth_keys raises several kinds on hostile bytes
        raise ProtocolError(f"bad signature: {type(e).__name__}") from None
    if signer != envelope.sender:
        raise ProtocolError(f"bad signature: signed by {signer}, not by {envelope.sender}")
    return decode(envelope.body)


class ReplayGuard:
    """Refuses messages seen before, or stamped outside ``±window_ms`` of now.

    Memory is bounded: nonces older than the window are forgotten, and past
    ``max_remembered`` the guard refuses new messages rather than grow.
    """

    def __init__(self, window_ms: int = 60_000, max_remembered: int = 1_000_000) -> None:
        self.window_ms = window_ms
        self.max_remembered = max_remembered
        self._seen: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, envelope: Envelope, now_ms: int | None = None) -> None:
        import time

        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if abs(envelope.timestamp_ms - now) > self.window_ms:
            raise ProtocolError(f"message stamped {envelope.timestamp_ms - now:+d} ms from now; "
                                f"outside the {self.window_ms} ms window (check the clocks)")
        key = (envelope.sender, envelope.nonce)
        if key in self._seen:
            raise ProtocolError("replayed message refused")
        if len(self._seen) >= self.max_remembered:
            cutoff = now - self.window_ms
            self._seen = {k: t for k, t in self._seen.items() if t >= cutoff}
            if len(self._seen) >= self.max_remembered:
                raise ProtocolError("too many recent messages to check for replays; slow down")
        self._seen[key] = envelope.timestamp_ms
        if len(self._seen) % 4096 == 0:
            cutoff = now - self.window_ms
            self._seen = {k: t for k, t in self._seen.items() if t >= cutoff}


def frame(envelope: Envelope) -> bytes:
    """Length-prefixed bytes of ``envelope`` (4-byte big-endian length)."""
    data = msgpack.packb(_fields(envelope), use_bin_type=True)
    return len(data).to_bytes(4, "big") + data


def _envelope(data: bytes) -> Envelope:
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data),
                                 max_str_len=len(data), max_array_len=16, max_map_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"malformed frame: {type(e).__name__}") from None
    types = (int, str, str, str, int, bytes, bytes)
    if not isinstance(fields, list) or len(fields) != 7 or not all(
            isinstance(f, t) and not isinstance(f, bool) for f, t in zip(fields, types)):
        raise ProtocolError("malformed frame: not an envelope")
    return Envelope(fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], fields[6])


def unframe(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Parse exactly one complete frame."""
    if len(data) < 4:
        raise ProtocolError("truncated frame")
    length = int.from_bytes(data[:4], "big")
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the maximum {max_bytes}")
    if len(data) != 4 + length:
        raise ProtocolError("truncated frame" if len(data) < 4 + length else "trailing bytes after frame")
    return _envelope(data[4:])


async def read_frame(reader: Any, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Read one frame from an ``asyncio.StreamReader``.

    Raises ProtocolError for an oversized or malformed frame (before reading an
    oversized body) and ``ConnectionError`` when the stream ends.
    """
    import asyncio

    try:
        head = await reader.readexactly(4)
        length = int.from_bytes(head, "big")
        if length > max_bytes:
            raise ProtocolError(f"frame of {length} bytes exceeds the maximum {max_bytes}")
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise ConnectionError("connection closed mid-frame" if e.partial else "connection closed") from None
    return _envelope(data)


async def write_frame(writer: Any, envelope: Envelope) -> None:
    writer.write(frame(envelope))
    await writer.drain()
