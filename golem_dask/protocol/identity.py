"""Identities on the market: keys, signatures, addresses.  Pure cryptography.

A party's identity is its Ethereum address.  :class:`Wallet` holds a private key and
signs (message hashes for market envelopes, transactions for payments) but never hands
the key out: it has no accessor for it, its ``repr`` shows only the address, and it
refuses to be pickled or copied, so it cannot ride along into a dask task graph, a log
record or a crash dump of a worker.

The module-level functions are what anyone holding only an address needs:
:func:`keccak256`, :func:`recover_address` (who signed this digest) and
:func:`checksum_address` (the one EIP-55 spelling of an address).

Nothing here talks to a chain.  ``eth_keys``/``eth_account`` cost about a second to
import, so they are imported inside the functions that need them; signature recovery
uses coincurve (libsecp256k1) when it is installed, else eth_keys' pure-Python backend,
50 to 100 times slower.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from golem_dask.errors import ConfigError, ProtocolError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Wallet", "address_of", "checksum_address", "keccak256", "recover_address", "signer_of"]

#: Order of the secp256k1 group; a private key must lie in ``[1, N - 1]``.
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

_HEX_KEY = re.compile(r"(?:0x)?([0-9a-fA-F]{64})")


# -- hashing and recovering signatures (no key needed) ----------------------------------

class _Crypto(NamedTuple):
    name: str
    keccak256: Callable[[bytes], bytes]
    #: (32-byte digest, 64-byte r || s, recovery id 0 or 1) -> 20-byte address; raises on failure.
    recover: Callable[[bytes, bytes, int], bytes]


_crypto_backend: _Crypto | None = None


def load_crypto(prefer_coincurve: bool = True) -> _Crypto:
    """The hashing and recovery functions: coincurve's if installed (and preferred), else eth_keys'."""
    keccak: Callable[[bytes], bytes]
    try:
        from Crypto.Hash import keccak as pycryptodome_keccak
    except ImportError:  # pragma: no cover - eth-account pulls in pycryptodome
        from eth_hash.auto import keccak as eth_hash_keccak

        keccak = eth_hash_keccak
    else:
        def keccak256_pycryptodome(data: bytes) -> bytes:
            return pycryptodome_keccak.new(digest_bits=256, data=data).digest()

        keccak = keccak256_pycryptodome

    if prefer_coincurve:
        try:
            import coincurve
        except ImportError:
            pass
        else:
            from_signature = coincurve.PublicKey.from_signature_and_message

            def recover_coincurve(digest: bytes, rs: bytes, recovery_id: int) -> bytes:
                point = from_signature(rs + bytes((recovery_id,)), digest, hasher=None)
                return keccak(point.format(compressed=False)[1:])[12:]

            return _Crypto("coincurve", keccak, recover_coincurve)

    from eth_keys import keys

    def recover_eth_keys(digest: bytes, rs: bytes, recovery_id: int) -> bytes:
        signature = keys.Signature(vrs=(recovery_id, int.from_bytes(rs[:32], "big"),
                                        int.from_bytes(rs[32:], "big")))
        return bytes(signature.recover_public_key_from_msg_hash(digest).to_canonical_address())

    return _Crypto("eth_keys", keccak, recover_eth_keys)


def crypto() -> _Crypto:
    """The backend in use (loaded on first call)."""
    global _crypto_backend
    if _crypto_backend is None:
        _crypto_backend = load_crypto()
    return _crypto_backend


def keccak256(data: bytes) -> bytes:
    """Ethereum's keccak-256 of ``data``.

    Examples
    --------
    >>> keccak256(b"").hex()[:16]
    'c5d2460186f7233c'
    """
    return crypto().keccak256(data)


def recover_address(digest: bytes, rs: bytes, recovery_id: int) -> bytes:
    """The 20-byte address whose key made signature ``rs`` (64 bytes) over ``digest``.

    Raises whatever the backend raises on an unrecoverable signature.
    """
    return crypto().recover(digest, rs, recovery_id)


_ADDRESS = re.compile(r"(?:0x)?([0-9a-fA-F]{40})")


def signer_of(digest: bytes, signature: bytes) -> str:
    """The checksummed address whose key made ``signature`` (65 bytes ``r || s || v``,
    as :meth:`Wallet.sign_message_hash` makes them) over the 32-byte ``digest``.

    The signature's shape is checked first: ``v`` 27 or 28, ``r`` and ``s`` in range and
    ``s`` low (a high ``s`` would make a second valid signature from every valid one).

    Raises
    ------
    ProtocolError
        ``"bad signature: ..."`` saying what is wrong.

    Examples
    --------
    >>> wallet = Wallet.from_key("11" * 32)
    >>> signer_of(b"\x01" * 32, wallet.sign_message_hash(b"\x01" * 32)) == wallet.address
    True
    """
    if not isinstance(signature, bytes | bytearray):
        raise ProtocolError(f"bad signature: {type(signature).__name__}, expected 65 bytes")
    if len(signature) != 65:
        raise ProtocolError(f"bad signature: {len(signature)} bytes, expected 65")
    v = signature[64]
    if v not in (27, 28):
        raise ProtocolError(f"bad signature: v is {v}, expected 27 or 28")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < r < _SECP256K1_N:
        raise ProtocolError("bad signature: r out of range")
    if not 0 < s <= _SECP256K1_N // 2:
        raise ProtocolError("bad signature: s out of range (not low-s)")
    try:
        return _checksum_of(recover_address(bytes(digest), bytes(signature[:64]), v - 27))
    except Exception:  # the backends raise several kinds on unrecoverable signatures
        raise ProtocolError("bad signature: no public key recovers from it") from None


def _checksum_of(address: bytes) -> str:
    return _cached_checksum(bytes(address))


def address_of(public_key: bytes) -> str:
    """The checksummed address a secp256k1 public key (33 or 65 bytes) belongs to.

    Raises
    ------
    ProtocolError
        If the bytes are not a public key.
    """
    import coincurve

    try:
        point = coincurve.PublicKey(bytes(public_key)).format(compressed=False)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"not a secp256k1 public key: {e}") from None
    return checksum_address(keccak256(point[1:])[12:])


def checksum_address(address: bytes | str) -> str:
    """The EIP-55 spelling of a 20-byte address, or of ``0x`` + 40 hex digits in any case.

    Raises
    ------
    ValueError
        If ``address`` is not an address; the message names the expected form.

    Examples
    --------
    >>> checksum_address("0x19e7e376e7c213b7e7e7e46cc70a5dd086daff2a")
    '0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A'
    """
    if isinstance(address, bytes | bytearray):
        if len(address) != 20:
            raise ValueError(f"an address is 20 bytes, not {len(address)}")
        digits = bytes(address).hex()
    else:
        match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
        if match is None:
            shown = repr(address) if len(repr(address)) <= 60 else repr(address)[:57] + "..."
            raise ValueError(f"{shown} is not an Ethereum address (0x followed by 40 hex digits)")
        digits = match.group(1).lower()
    hashed = keccak256(digits.encode("ascii")).hex()
    return "0x" + "".join(d.upper() if h in "89abcdef" else d for d, h in zip(digits, hashed))


# -- the key holder -------------------------------------------------------------------------


class _MalformedKey(ValueError):
    """Internal: the key material is malformed.  The message never contains it."""


def _parse_key(key: str | bytes | bytearray) -> bytes:
    # Every error message here describes the *shape* that was expected and never
    # includes the input: a typo'd key is still mostly a key.
    if isinstance(key, str):
        match = _HEX_KEY.fullmatch(key.strip())
        if match is None:
            raise _MalformedKey("expected 64 hex digits, optionally prefixed with 0x")
        raw = bytes.fromhex(match.group(1))
    elif isinstance(key, bytes | bytearray):
        if len(key) != 32:
            raise _MalformedKey(f"expected 32 bytes, got {len(key)}")
        raw = bytes(key)
    else:
        raise _MalformedKey(f"expected a hex string or 32 bytes, got {type(key).__name__}")
    if not 0 < int.from_bytes(raw, "big") < _SECP256K1_N:
        raise _MalformedKey("the value is not a valid secp256k1 private key")
    return raw


class Wallet:
    """An Ethereum account whose private key never leaves the object.

    Create one with :meth:`generate`, :meth:`from_key` or :meth:`from_env`.  The
    wallet signs; it does not talk to a chain.

    Parameters
    ----------
    key:
        Use the class methods instead; the constructor is private API.

    Attributes
    ----------
    address:
        The checksummed address of the account.

    Examples
    --------
    >>> wallet = Wallet.generate()
    >>> wallet.address.startswith("0x") and len(wallet.address) == 42
    True
    >>> repr(wallet) == f"Wallet(address={wallet.address!r})"
    True
    >>> import pickle
    >>> pickle.dumps(wallet)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: Wallet objects hold a private key and cannot be pickled ...
    """

    # __slots__ rather than __dict__ keeps the key out of vars(wallet), which generic
    # serialisers and debuggers' "show object" views walk.
    __slots__ = ("__key", "_address", "_openers")

    def __init__(self, _key: bytes, /) -> None:
        from eth_keys import keys  # lazy: ~0.4 s import

        self.__key = _key
        self._address: str = keys.PrivateKey(_key).public_key.to_checksum_address()
        self._openers: dict[bytes, Any] = {}  # recent senders' ephemeral keys -> their opener

    # --- construction -------------------------------------------------------------

    @classmethod
    def generate(cls) -> Wallet:
        """Create a wallet with a fresh random key from the OS's CSPRNG.

        Examples
        --------
        >>> Wallet.generate().address != Wallet.generate().address
        True
        """
        while True:
            raw = secrets.token_bytes(32)
            # Rejection sampling: about 1 in 2**128 draws is outside [1, N-1].
            if 0 < int.from_bytes(raw, "big") < _SECP256K1_N:
                return cls(raw)

    @classmethod
    def from_key(cls, key: str | bytes | bytearray) -> Wallet:
        """Create a wallet from a private key.

        Parameters
        ----------
        key:
            64 hex digits (``0x`` prefix optional) or 32 raw bytes.

        Raises
        ------
        ConfigError
            If ``key`` is malformed.  The message never repeats the key.

        Examples
        --------
        >>> Wallet.from_key("0x" + "11" * 32).address
        '0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A'
        """
        try:
            return cls(_parse_key(key))
        except _MalformedKey as e:
            # `from None`: the chained exception would add nothing but another frame
            # that a traceback printer might show with locals.
            raise ConfigError(f"malformed private key: {e}") from None

    @classmethod
    def from_env(cls, var_name: str, *, environ: Mapping[str, str] | None = None) -> Wallet:
        """Create a wallet from a private key in an environment variable.

        Parameters
        ----------
        var_name:
            Name of the variable, e.g. ``"GOLEM_DASK_PRIVATE_KEY"``.
        environ:
            Mapping to read instead of :data:`os.environ` (for tests).

        Raises
        ------
        ConfigError
            If the variable is unset, empty or does not hold a valid key.  The message
            names the variable and never repeats its value.

        Examples
        --------
        >>> env = {"MY_KEY": "11" * 32}
        >>> Wallet.from_env("MY_KEY", environ=env).address
        '0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A'
        >>> Wallet.from_env("MISSING_KEY", environ={})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        golem_dask.errors.ConfigError: environment variable MISSING_KEY is not set; ...
        """
        env = os.environ if environ is None else environ
        value = env.get(var_name)
        if value is None or not value.strip():
            raise ConfigError(
                f"environment variable {var_name} is not set; set it to the requestor's "
                "private key (64 hex digits, optionally prefixed with 0x)"
            )
        try:
            return cls(_parse_key(value))
        except _MalformedKey as e:
            raise ConfigError(
                f"environment variable {var_name} does not hold a valid private key: {e}"
            ) from None

    @classmethod
    def from_keystore(cls, path: str | os.PathLike[str], password_env: str,
                      *, environ: Mapping[str, str] | None = None) -> Wallet:
        """Decrypt an Ethereum keystore file (JSON, as geth or ``eth-account`` write it).

        The password comes from the environment variable ``password_env``, never from
        an argument that would show in a shell history or a process list.

        Raises
        ------
        ConfigError
            If the file is missing or malformed, the variable unset, or the password
            wrong; the message never includes the password or the key.
        """
        env = os.environ if environ is None else environ
        password = env.get(password_env)
        if password is None:
            raise ConfigError(f"environment variable {password_env} (the keystore password) is not set")
        try:
            with open(path) as f:
                keystore = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read keystore {path}: {e.strerror}") from None
        from eth_account import Account

        try:
            key = Account.decrypt(keystore, password)
        except Exception:
            raise ConfigError(f"cannot decrypt keystore {path}: wrong password in {password_env} "
                              "or not a keystore file") from None
        return cls(bytes(key))

    # --- public API ---------------------------------------------------------------

    @property
    def address(self) -> str:
        """The checksummed address of this wallet's account."""
        return self._address

    def sign_transaction(self, tx: dict[str, Any]) -> bytes:
        """Sign a transaction and return the raw signed bytes, ready to broadcast.

        Parameters
        ----------
        tx:
            A complete transaction dict as accepted by ``eth_account``: ``nonce``,
            ``gas``, ``chainId``, fee fields, ``to``, ``value``, ``data``.  A ``from``
            key, if present, must equal :attr:`address`.

        Returns
        -------
        bytes
            The RLP-encoded signed transaction, for ``eth_sendRawTransaction``.

        Raises
        ------
        ValueError
            If ``tx["from"]`` names another account or ``tx`` is incomplete.

        Examples
        --------
        >>> wallet = Wallet.from_key("11" * 32)
        >>> raw = wallet.sign_transaction({
        ...     "nonce": 0, "gas": 21000, "maxFeePerGas": 2 * 10**9,
        ...     "maxPriorityFeePerGas": 10**9, "chainId": 1, "to": wallet.address,
        ...     "value": 1, "data": b"",
        ... })
        >>> raw[0]  # EIP-1559 transactions are type 2
        2
        """
        from eth_account import Account  # lazy: ~1 s import

        tx = dict(tx)
        sender = tx.pop("from", None)
        if sender is not None and str(sender).lower() != self._address.lower():
            raise ValueError(
                f"transaction is from {sender} but this wallet is {self._address}"
            )
        try:
            signed = Account.sign_transaction(tx, self.__key)
        except Exception as e:
            # eth_account's errors describe the transaction, not the key, but re-raise
            # without chaining so no frame holding the key is attached to the error.
            raise ValueError(f"could not sign transaction: {type(e).__name__}: {e}") from None
        return bytes(signed.raw_transaction)

    def sign_message_hash(self, message_hash: bytes) -> bytes:
        """Sign a 32-byte hash and return the 65-byte ``r || s || v`` signature.

        Only sign hashes you computed yourself (for example with EIP-191 or EIP-712
        encoding): a hash can be the hash of a transaction.

        Examples
        --------
        >>> sig = Wallet.from_key("11" * 32).sign_message_hash(b"\\x00" * 32)
        >>> len(sig)
        65
        """
        from eth_keys import keys

        if not isinstance(message_hash, bytes | bytearray) or len(message_hash) != 32:
            raise ValueError("message_hash must be exactly 32 bytes")
        # eth_keys signs through coincurve (libsecp256k1) when it is installed: a hub
        # checks thousands of signed offers, and providers sign every reply.
        signature = keys.PrivateKey(self.__key).sign_msg_hash(bytes(message_hash))
        r, s, v = signature.r, signature.s, signature.v
        return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v + 27])

    @property
    def public_key(self) -> bytes:
        """The 33-byte compressed public key (not secret: it hashes to :attr:`address`)."""
        import coincurve

        return bytes(coincurve.PrivateKey(self.__key).public_key.format(compressed=True))

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        """Open a secret sealed to this wallet (:mod:`~golem_dask.protocol.sealing`).

        The key exchange of the last few senders' ephemeral keys is kept, so a script's
        several secrets cost one exchange.
        """
        from golem_dask.protocol.sealing import opener, split

        ephemeral, nonce, ciphertext = split(blob)
        opened = self._openers.pop(ephemeral, None) or opener(self.__key, ephemeral)
        self._openers[ephemeral] = opened
        while len(self._openers) > 16:
            del self._openers[next(iter(self._openers))]
        return opened(nonce, ciphertext, aad)

    # --- leak prevention ----------------------------------------------------------

    def __repr__(self) -> str:
        return f"Wallet(address={self._address!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "Wallet objects hold a private key and cannot be pickled or copied; pass "
            "the address (wallet.address) to remote code and keep signing in the "
            "requestor process"
        )

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # object.__reduce_ex__ would fall back to copyreg for protocol >= 2 without
        # consulting __reduce__ in some paths; refuse explicitly for every protocol.
        self.__reduce__()

    def __copy__(self) -> NoReturn:
        self.__reduce__()

    def __deepcopy__(self, memo: object) -> NoReturn:
        self.__reduce__()

    def __getstate__(self) -> NoReturn:
        self.__reduce__()

    def __eq__(self, other: object) -> bool:
        # Two wallets with the same address hold the same key; comparing addresses
        # avoids comparing (and timing) the key bytes.
        if not isinstance(other, Wallet):
            return NotImplemented
        return self._address == other._address

    def __hash__(self) -> int:
        return hash(self._address)


#: Senders repeat: their checksums are kept (a keccak each, on every verified message).
_cached_checksum = functools.lru_cache(maxsize=1 << 14)(checksum_address)
