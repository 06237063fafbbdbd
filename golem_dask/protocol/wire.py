"""msgpack encoding of protocol messages.

A message encodes as a msgpack extension holding its type name and its fields in
declaration order; ``Decimal`` encodes as an extension holding its exact text, so money
never passes through a float.  Decoding accepts only the known message types, refuses
NaN and infinities (and, through the messages' own checks, negative amounts), and raises
:class:`~golem_dask.errors.ProtocolError` on anything else.

On the network every message travels in a signed :class:`Envelope` (:func:`seal`,
:func:`verify`), framed with a 4-byte length (:func:`frame`, :func:`unframe`,
:func:`read_frame`); a :class:`ReplayGuard` refuses replays.
Signatures are made and recovered by :mod:`golem_dask.protocol.identity`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import msgpack

from golem_dask.errors import ProtocolError
from golem_dask.protocol.identity import keccak256, signer_of
from golem_dask.protocol.messages import MESSAGE_TYPES
from golem_dask.protocol.messages import now_ms as _clock_ms

if TYPE_CHECKING:
    import asyncio

    from golem_dask.protocol.identity import Wallet

#: The EIP-55 spelling of a recovered 20-byte signer (a keccak each): a peer signs many frames.

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


_CONTAINERS = (list, dict, float)


def _finite_floats(obj: Any) -> Any:
    # msgpack makes exactly these types (a message's own fields were checked when its
    # extension was unpacked), so exact type tests see every float; only containers
    # and floats are visited.
    kind = type(obj)
    if kind is float:
        if not math.isfinite(obj):
            raise ProtocolError(f"non-finite number {obj} on the wire")
    elif kind is list or kind is dict:
        for item in obj if kind is list else obj.values():
            if type(item) in _CONTAINERS:
                _finite_floats(item)
    return obj


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_DECIMAL:
        try:
            value = Decimal(data.decode())
        except (InvalidOperation, UnicodeDecodeError) as e:
            raise ProtocolError("malformed decimal on the wire") from e
        # NaN and infinities are refused before any logic sees them (negative amounts
        # and usage are refused by the messages that carry them).
        if not value.is_finite():
            raise ProtocolError(f"non-finite decimal {value} on the wire")
        return value
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
        # Field checks in __post_init__ meet hostile values: a list where a mapping
        # belongs raises AttributeError, a bad key KeyError.
        except (TypeError, ValueError, AttributeError, KeyError, ArithmeticError) as e:
            raise ProtocolError(f"malformed {name}: {e}") from e
    raise ProtocolError(f"unknown msgpack extension {code}")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True, datetime=False)


def _unpack(data: bytes) -> Any:
    return _finite_floats(msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=True))


def encode(message: Any) -> bytes:
    """Encode a protocol message (or plain data containing messages) to bytes.

    Examples
    --------
    >>> from golem_dask.protocol.messages import Activity
    >>> decode(encode(Activity("a1", "g1", "Ready", None, 0)))
    Activity(id='a1', agreement_id='g1', state=<ActivityState.READY: 'Ready'>, reason=None, timestamp_ms=0)
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

#: Version of the envelope format; :func:`verify` refuses any other.
PROTOCOL_VERSION = 1
#: Default limit on one frame's size (the 4-byte length prefix excluded).
MAX_FRAME_BYTES = 1 << 20

#: Signed digests start with this, so an envelope signature can never be a transaction's.
_DOMAIN = b"golem-dask envelope\x00"
_HEADER_BYTES = 4
_NONCE = re.compile(r"[0-9a-f]{32}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_FIELD_NAMES = ("version", "kind", "sender", "nonce", "timestamp_ms", "body", "signature")
# Exact types: subclasses could override comparison and hashing.
_FIELD_TYPES: tuple[type, ...] = (int, str, str, str, int, bytes, bytes)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One signed message on the wire: who says what, when, and the proof.

    Make envelopes with :func:`seal`; check one with :func:`verify` (and, against
    replays, :meth:`ReplayGuard.check`) before trusting any field.  The constructor
    validates nothing, so that parsing hostile bytes never fails half-way.

    Attributes
    ----------
    version:
        :data:`PROTOCOL_VERSION` of the sender.
    kind:
        What the message is for, e.g. ``"publish"``; signed with the payload.
    sender:
        Checksummed Ethereum address of the signer.
    nonce:
        32 random lowercase hex digits, unique per message.
    timestamp_ms:
        When the message was sealed, in milliseconds since the epoch.
    body:
        The payload as :func:`encode` made it.
    signature:
        65-byte ``r || s || v`` signature by ``sender`` over :meth:`digest`.

    Examples
    --------
    >>> from golem_dask.protocol.identity import Wallet
    >>> env = seal(Wallet.from_key("11" * 32), "ping", {"n": 1}, now_ms=1_700_000_000_000)
    >>> env.sender, env.kind, env.timestamp_ms, len(env.nonce), len(env.signature)
    ('0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A', 'ping', 1700000000000, 32, 65)
    >>> decode(env.body)
    {'n': 1}
    """

    version: int
    kind: str
    sender: str
    nonce: str
    timestamp_ms: int
    body: bytes
    signature: bytes

    def digest(self) -> bytes:
        """The 32-byte keccak-256 hash that :attr:`signature` signs.

        It covers every field but the signature, msgpack-encoded as one array (strings
        as str, ``body`` as bin) after a domain prefix, so no two distinct envelopes
        share a digest and no digest is a transaction's.

        Raises
        ------
        TypeError, ValueError, OverflowError
            If a field cannot be msgpack-encoded (only hand-made envelopes).

        Examples
        --------
        >>> import dataclasses
        >>> from golem_dask.protocol.identity import Wallet
        >>> env = seal(Wallet.from_key("11" * 32), "ping", None, now_ms=0)
        >>> len(env.digest())
        32
        >>> env.digest() == dataclasses.replace(env, kind="pong").digest()
        False
        """
        fields = [self.version, self.kind, self.sender, self.nonce, self.timestamp_ms, self.body]
        return keccak256(_DOMAIN + msgpack.packb(fields, use_bin_type=True))


def _short(value: object) -> str:
    """A repr of hostile input short enough for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_field_types(envelope: Envelope) -> None:
    if type(envelope) is not Envelope:
        raise ProtocolError(f"expected an Envelope, got {type(envelope).__name__}")
    for name, expected in zip(_FIELD_NAMES, _FIELD_TYPES):
        value = getattr(envelope, name)
        if type(value) is not expected:
            raise ProtocolError(f"malformed envelope: {name} is {type(value).__name__}, "
                                f"expected {expected.__name__}")


def seal(wallet: Wallet, kind: str, payload: Any, *, now_ms: int | None = None) -> Envelope:
    """Encode ``payload`` and sign it with ``wallet`` as a message of ``kind``.

    Parameters
    ----------
    wallet:
        Signs the envelope; its address becomes :attr:`Envelope.sender`.
    kind:
        What the message is for, e.g. ``"publish"``.
    payload:
        Anything :func:`encode` accepts: protocol messages, ``Decimal``, plain data.
    now_ms:
        The timestamp to stamp, in milliseconds since the epoch (default: now).

    Returns
    -------
    Envelope
        Signed, with a fresh random nonce.

    Raises
    ------
    ProtocolError
        If ``payload`` cannot be encoded or ``kind``/``now_ms`` have the wrong type.

    Examples
    --------
    >>> from decimal import Decimal
    >>> from golem_dask.protocol.identity import Wallet
    >>> env = seal(Wallet.from_key("11" * 32), "ping", {"n": Decimal("0.1")}, now_ms=0)
    >>> verify(env)
    {'n': Decimal('0.1')}
    """
    if type(kind) is not str:
        raise ProtocolError(f"kind must be a str, not {type(kind).__name__}")
    stamp = _clock_ms() if now_ms is None else now_ms
    if type(stamp) is not int:
        raise ProtocolError(f"now_ms must be an int, not {type(stamp).__name__}")
    body = encode(payload)
    sender = wallet.address
    nonce = os.urandom(16).hex()
    unsigned = Envelope(PROTOCOL_VERSION, kind, sender, nonce, stamp, body, b"")
    try:
        digest = unsigned.digest()
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot seal {kind!r}: {e}") from e
    signature = wallet.sign_message_hash(digest)
    return Envelope(PROTOCOL_VERSION, kind, sender, nonce, stamp, body, signature)


def verify(envelope: Envelope) -> Any:
    """The decoded payload of ``envelope``, if ``envelope.sender`` really signed it.

    Checks the field types, the protocol version, the signature's shape (65 bytes,
    ``v`` 27 or 28, ``r`` and ``s`` in range, low ``s``), then recovers the signer from
    the signature over :meth:`Envelope.digest` and compares it with the sender, which
    must be in checksummed form.  No result is cached between calls (only the EIP-55
    spelling of each recovered address, which depends on nothing else).  Replays are not
    checked here: see :class:`ReplayGuard`.

    Parameters
    ----------
    envelope:
        As received, e.g. from :func:`unframe` or :func:`read_frame`.

    Returns
    -------
    Any
        ``decode(envelope.body)``.

    Raises
    ------
    ProtocolError
        On any failure, and never anything else: ``"bad signature: ..."`` if the
        signature is malformed or not the sender's; a message naming both versions
        if the version differs; ``"malformed ..."`` for wrong field types or an
        undecodable body.

    Examples
    --------
    >>> import dataclasses
    >>> from golem_dask.protocol.identity import Wallet
    >>> alice, bob = Wallet.from_key("11" * 32), Wallet.from_key("22" * 32)
    >>> env = seal(alice, "ping", [1, 2])
    >>> verify(env)
    [1, 2]
    >>> verify(dataclasses.replace(env, sender=bob.address))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    golem_dask.errors.ProtocolError: bad signature: signed by 0x..., not by 0x1563915e194D8CfBA1943570603F7606A3115508
    """
    _check_field_types(envelope)
    if envelope.version != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks protocol version {envelope.version}, this golem-dask "
                            f"speaks version {PROTOCOL_VERSION}; upgrade the older side")
    sender = envelope.sender
    if _ADDRESS.fullmatch(sender) is None:
        raise ProtocolError(f"bad signature: sender {_short(sender)} is not an address")
    if _NONCE.fullmatch(envelope.nonce) is None:
        raise ProtocolError(f"malformed envelope: nonce {_short(envelope.nonce)} is not "
                            "32 lowercase hex digits")
    try:
        digest = envelope.digest()
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"malformed envelope: {type(e).__name__}: {_short(str(e))}") from None
    expected = signer_of(digest, envelope.signature)
    if expected != sender:
        if expected.lower() == sender.lower():
            raise ProtocolError(f"bad signature: sender {sender} is not checksummed (expected {expected})")
        raise ProtocolError(f"bad signature: signed by {expected}, not by {sender}")
    try:
        return decode(envelope.body)
    except ProtocolError:
        raise
    except Exception as e:  # decode should raise only ProtocolError; never let a sender crash us
        raise ProtocolError(f"malformed {_short(envelope.kind)} payload: {type(e).__name__}") from e


class ReplayGuard:
    """Refuses messages seen before, or stamped outside ``±window_ms`` of now.

    Call :meth:`check` on every envelope that :func:`verify` accepted (checking an
    unverified one would let anyone spend a sender's nonces).  The guard remembers
    each ``(sender, nonce)`` until its timestamp leaves the window, after which the
    timestamp alone gets the message refused.  Memory is bounded: past
    ``max_remembered`` nonces within the window, the guard refuses new messages
    rather than grow.

    The window's lower edge follows the latest ``now`` the guard has seen, so a clock
    that steps backwards cannot readmit a message whose nonce was forgotten.

    Parameters
    ----------
    window_ms:
        How far a message's timestamp may be from now, in milliseconds.
    max_remembered:
        Most nonces remembered at once (about 120 bytes each).

    Examples
    --------
    >>> from golem_dask.protocol.identity import Wallet
    >>> guard = ReplayGuard(window_ms=60_000)
    >>> env = seal(Wallet.from_key("11" * 32), "ping", None, now_ms=1_000_000)
    >>> guard.check(env, now_ms=1_000_500)
    >>> guard.check(env, now_ms=1_000_600)
    Traceback (most recent call last):
    ...
    golem_dask.errors.ProtocolError: replayed message refused
    >>> ReplayGuard().check(env, now_ms=2_000_000)
    Traceback (most recent call last):
    ...
    golem_dask.errors.ProtocolError: message stamped -1000000 ms from now, outside the ±60000 ms window; check the clocks
    """

    def __init__(self, window_ms: int = 60_000, max_remembered: int = 1_000_000) -> None:
        if type(window_ms) is not int or window_ms < 0:
            raise ValueError(f"window_ms must be an int >= 0, not {window_ms!r}")
        if type(max_remembered) is not int or max_remembered < 1:
            raise ValueError(f"max_remembered must be an int >= 1, not {max_remembered!r}")
        self.window_ms = window_ms
        self.max_remembered = max_remembered
        # Nonces are forgotten a bucket at a time; a bucket spans 1/64 of the window.
        self._bucket_ms = max(1, window_ms // 64)
        self._seen: set[bytes] = set()
        self._buckets: dict[int, list[bytes]] = {}
        self._bucket_heap: list[int] = []
        self._latest_now: int | None = None

    def __len__(self) -> int:
        """How many nonces the guard remembers now."""
        return len(self._seen)

    def check(self, envelope: Envelope, now_ms: int | None = None) -> None:
        """Remember ``envelope``, or refuse it as a replay or out of its time window.

        Parameters
        ----------
        envelope:
            An envelope :func:`verify` accepted.
        now_ms:
            The current time in milliseconds since the epoch (default: the clock).

        Raises
        ------
        ProtocolError
            If the timestamp is outside the window, the ``(sender, nonce)`` pair was
            seen within it, the envelope is malformed, or the guard is full.

        Examples
        --------
        >>> from golem_dask.protocol.identity import Wallet
        >>> guard = ReplayGuard(window_ms=1_000)
        >>> guard.check(seal(Wallet.from_key("11" * 32), "ping", None, now_ms=5_000), now_ms=5_000)
        >>> len(guard)
        1
        """
        _check_field_types(envelope)
        sender, nonce, stamp = envelope.sender, envelope.nonce, envelope.timestamp_ms
        if _ADDRESS.fullmatch(sender) is None or _NONCE.fullmatch(nonce) is None:
            raise ProtocolError("malformed envelope: sender or nonce has the wrong form")
        now = _clock_ms() if now_ms is None else now_ms
        if self._latest_now is None or now > self._latest_now:
            self._latest_now = now
        oldest = self._latest_now - self.window_ms
        if stamp < oldest or stamp > now + self.window_ms:
            raise ProtocolError(f"message stamped {stamp - now:+d} ms from now, outside the "
                                f"±{self.window_ms} ms window; check the clocks")
        self._forget_older_than(oldest)
        key = bytes.fromhex(sender[2:] + nonce)  # 36 bytes; sender's letter case ignored
        if key in self._seen:
            raise ProtocolError("replayed message refused")
        if len(self._seen) >= self.max_remembered:
            raise ProtocolError(f"{len(self._seen)} messages within {self.window_ms} ms are too many "
                                "to check for replays; slow down")
        self._seen.add(key)
        bucket_id = stamp // self._bucket_ms
        bucket = self._buckets.get(bucket_id)
        if bucket is None:
            bucket = self._buckets[bucket_id] = []
            heapq.heappush(self._bucket_heap, bucket_id)
        bucket.append(key)

    def _forget_older_than(self, oldest: int) -> None:
        # Bucket b holds stamps b * size ... (b + 1) * size - 1: all older iff (b + 1) * size <= oldest.
        heap, size = self._bucket_heap, self._bucket_ms
        while heap and (heap[0] + 1) * size <= oldest:
            for key in self._buckets.pop(heapq.heappop(heap)):
                self._seen.discard(key)


def frame(envelope: Envelope) -> bytes:
    """Length-prefixed bytes of ``envelope``.

    A 4-byte big-endian length, then a msgpack array of the seven fields in
    declaration order (strings as str, ``body`` and ``signature`` as bin).

    Raises
    ------
    ProtocolError
        If a field has the wrong type or cannot be msgpack-encoded.

    Examples
    --------
    >>> from golem_dask.protocol.identity import Wallet
    >>> env = seal(Wallet.from_key("11" * 32), "ping", None, now_ms=0)
    >>> data = frame(env)
    >>> int.from_bytes(data[:4], "big") == len(data) - 4
    True
    >>> unframe(data) == env
    True
    """
    _check_field_types(envelope)
    try:
        data = msgpack.packb([envelope.version, envelope.kind, envelope.sender, envelope.nonce,
                              envelope.timestamp_ms, envelope.body, envelope.signature], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:  # an int beyond 64 bits, a lone surrogate
        raise ProtocolError(f"cannot frame envelope: {type(e).__name__}: {_short(str(e))}") from None
    if len(data) >= 1 << (8 * _HEADER_BYTES):
        raise ProtocolError(f"envelope of {len(data)} bytes is too large to frame")
    return len(data).to_bytes(_HEADER_BYTES, "big") + data


def _parse_envelope(data: bytes | memoryview) -> Envelope:
    """The envelope in a frame's content (the length prefix removed)."""
    size = len(data)
    try:
        fields = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                                 max_bin_len=size, max_str_len=size, max_array_len=len(_FIELD_NAMES),
                                 max_map_len=0, max_ext_len=0)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        raise ProtocolError(f"malformed frame: {type(e).__name__}") from None
    if type(fields) is not list or len(fields) != len(_FIELD_NAMES):
        raise ProtocolError(f"malformed frame: not an array of {len(_FIELD_NAMES)} envelope fields")
    for name, expected, value in zip(_FIELD_NAMES, _FIELD_TYPES, fields):
        if type(value) is not expected:
            raise ProtocolError(f"malformed frame: {name} is {type(value).__name__}, expected {expected.__name__}")
    # msgpack can spell one value several ways (a uint64 or an int64 for a timestamp):
    # only the one encoding frame() makes is accepted, so that a frame's bytes and its
    # signed meaning stay one-to-one.
    if msgpack.packb(fields, use_bin_type=True) != data:
        raise ProtocolError("malformed frame: not in canonical msgpack form")
    return Envelope(*fields)


def unframe(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Parse exactly one complete frame, as :func:`frame` makes them.

    The envelope is not verified: call :func:`verify` on it.

    Parameters
    ----------
    data:
        The frame, length prefix included.
    max_bytes:
        Refuse frames whose content is longer.

    Raises
    ------
    ProtocolError
        If ``data`` is truncated, oversized, has trailing bytes, or does not hold the
        seven envelope fields with the right types.

    Examples
    --------
    >>> from golem_dask.protocol.identity import Wallet
    >>> data = frame(seal(Wallet.from_key("11" * 32), "ping", "hi"))
    >>> verify(unframe(data))
    'hi'
    >>> unframe(data[:-1])
    Traceback (most recent call last):
    ...
    golem_dask.errors.ProtocolError: truncated frame: 165 of 166 bytes
    >>> unframe(b"\\xff\\xff\\xff\\xff")
    Traceback (most recent call last):
    ...
    golem_dask.errors.ProtocolError: frame of 4294967295 bytes exceeds the maximum 1048576
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, bytes | bytearray):
        raise ProtocolError(f"a frame is bytes, not {type(data).__name__}")
    if len(data) < _HEADER_BYTES:
        raise ProtocolError(f"truncated frame: {len(data)} of {_HEADER_BYTES} header bytes")
    length = int.from_bytes(data[:_HEADER_BYTES], "big")
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the maximum {max_bytes}")
    got = len(data) - _HEADER_BYTES
    if got < length:
        raise ProtocolError(f"truncated frame: {got} of {length} bytes")
    if got > length:
        raise ProtocolError(f"{got - length} trailing bytes after the frame")
    return _parse_envelope(memoryview(data)[_HEADER_BYTES:])


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """Read one frame from a stream.

    The length is checked before the body is read, so an oversized frame costs the
    reader 4 bytes, not ``max_bytes``.

    Parameters
    ----------
    reader:
        The stream to read from.
    max_bytes:
        Refuse frames whose content is longer.

    Returns
    -------
    Envelope
        Parsed but not verified: call :func:`verify` on it.

    Raises
    ------
    ProtocolError
        If the frame is oversized (``"frame of N bytes exceeds the maximum M"``) or
        malformed.  Its bytes may be left unread: close the connection.
    ConnectionError
        If the stream ends before a whole frame arrived.

    Examples
    --------
    >>> import asyncio
    >>> from golem_dask.protocol.identity import Wallet
    >>> async def main():
    ...     reader = asyncio.StreamReader()
    ...     reader.feed_data(frame(seal(Wallet.from_key("11" * 32), "ping", [1, 2])))
    ...     reader.feed_eof()
    ...     print(verify(await read_frame(reader)))
    ...     await read_frame(reader)
    >>> asyncio.run(main())
    Traceback (most recent call last):
    ...
    ConnectionError: connection closed
    """
    import asyncio

    try:
        head = await reader.readexactly(_HEADER_BYTES)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise ConnectionError("connection closed") from None
        raise ConnectionError(f"connection closed inside a frame header ({len(e.partial)} of "
                              f"{_HEADER_BYTES} bytes)") from None
    length = int.from_bytes(head, "big")
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the maximum {max_bytes}")
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise ConnectionError(f"connection closed inside a frame ({len(e.partial)} of {length} bytes)") from None
    return _parse_envelope(data)
