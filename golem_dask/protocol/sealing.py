"""Secrets sealed to one provider: only the holder of its key can open them.

A requestor sends storage credentials and TLS keys through a hub to a provider it does
not know: the hub must see only ciphertext.  :func:`seal` encrypts to the provider's
public key (which the provider states in its offer and which hashes to its address, so
nobody can put their own key there): an ephemeral secp256k1 key, ECDH with the
provider's key, HKDF-SHA256, then AES-256-GCM with associated data naming what the
secret is for (the agreement and activity), so a sealed blob cannot be replayed into
another activity.  The provider opens it with :meth:`Wallet.unseal
<golem_dask.protocol.identity.Wallet.unseal>`; its private key never leaves the Wallet.

Examples
--------
>>> from golem_dask.protocol.identity import Wallet
>>> provider = Wallet.from_key("22" * 32)
>>> blob = seal(provider.public_key, b"s3 secret", b"agreement-1/activity-1")
>>> provider.unseal(blob, b"agreement-1/activity-1")
b's3 secret'
>>> provider.unseal(blob, b"agreement-1/activity-2")
Traceback (most recent call last):
...
golem_dask.errors.ProtocolError: a sealed secret does not open for this provider and activity: it was sealed to another key or altered
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from golem_dask.errors import ProtocolError
from golem_dask.protocol import properties as P
from golem_dask.protocol.identity import address_of
from golem_dask.protocol.messages import Agreement, ExeCommand
from golem_dask.protocol.wire import decode, encode

#: Format version, then the ephemeral public key (33 bytes), the nonce (12), the ciphertext.
_VERSION = 1
_EPHEMERAL = 33
_NONCE = 12
_INFO = b"golem-dask sealed secret v1"


def _key(shared: bytes, ephemeral: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral, info=_INFO).derive(shared)


class Sealer:
    """Seals any number of secrets to one public key with one ephemeral key and one key
    exchange (a worker's setup script holds several: TLS files, inputs); each secret gets
    its own nonce.

    Raises
    ------
    ProtocolError
        If ``public_key`` is not a secp256k1 public key (33 or 65 bytes).
    """

    def __init__(self, public_key: bytes) -> None:
        import coincurve
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            recipient = coincurve.PublicKey(bytes(public_key))
        except (ValueError, TypeError) as e:
            raise ProtocolError(f"not a secp256k1 public key to seal to: {e}") from None
        ephemeral = coincurve.PrivateKey()
        self._header = bytes((_VERSION,)) + ephemeral.public_key.format(compressed=True)
        self._aead = AESGCM(_key(ephemeral.ecdh(recipient.format()), self._header[1:]))

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return self._header + nonce + self._aead.encrypt(nonce, plaintext, aad)


def seal(public_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``public_key`` opens it, for ``aad``."""
    return Sealer(public_key).seal(plaintext, aad)


def split(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """``(ephemeral public key, nonce, ciphertext)`` of a sealed blob, or ProtocolError."""
    if not isinstance(blob, bytes | bytearray) or len(blob) < 1 + _EPHEMERAL + _NONCE + 16 or blob[0] != _VERSION:
        raise ProtocolError("malformed sealed secret")
    return (bytes(blob[1:1 + _EPHEMERAL]), bytes(blob[1 + _EPHEMERAL:1 + _EPHEMERAL + _NONCE]),
            bytes(blob[1 + _EPHEMERAL + _NONCE:]))


def opener(private_key: bytes, ephemeral_public: bytes) -> Callable[[bytes, bytes, bytes], bytes]:
    """``open(nonce, ciphertext, aad)`` for the secrets one :class:`Sealer` made; only
    :class:`~golem_dask.protocol.identity.Wallet` calls this, with its own key."""
    import coincurve
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        aead = AESGCM(_key(coincurve.PrivateKey(private_key).ecdh(ephemeral_public), ephemeral_public))
    except (ValueError, TypeError):
        aead = None

    def open_one(nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            if aead is None:
                raise ValueError("no key")
            return aead.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError, TypeError):
            raise ProtocolError("a sealed secret does not open for this provider and activity: it was sealed to "
                                "another key or altered") from None

    return open_one


def activity_aad(agreement_id: str, activity_id: str) -> bytes:
    """What a secret sealed for one activity is bound to."""
    return f"golem-dask activity {agreement_id}/{activity_id}".encode()


def provider_key(agreement: Agreement) -> bytes:
    """The public key the provider states in its offer, checked against its address.

    Raises
    ------
    ProtocolError
        If the offer states none, or a key that is not the provider's.
    """
    stated = agreement.offer.properties.get(P.NODE_PUBKEY)
    try:
        key = bytes.fromhex(str(stated).removeprefix("0x")) if stated else b""
    except ValueError:
        key = b""
    if not key:
        raise ProtocolError(f"provider {agreement.provider_id} states no public key ({P.NODE_PUBKEY}) to encrypt "
                            "secrets to; its offer is not from golem-dask or is malformed")
    if address_of(key) != agreement.provider_id:
        raise ProtocolError(f"the public key in provider {agreement.provider_id}'s offer is not its own")
    return key


def seal_command(command: ExeCommand, public_key: bytes, aad: bytes) -> ExeCommand:
    """A ``transfer`` with all its arguments (URLs, which may carry tokens, and storage
    options) sealed to ``public_key``; other commands unchanged."""
    return seal_commands([command], public_key, aad)[0]


def seal_commands(commands: list[ExeCommand], public_key: bytes, aad: bytes) -> list[ExeCommand]:
    """:func:`seal_command` over a script, with one key exchange for all of it."""
    sealer: Sealer | None = None
    out = []
    for command in commands:
        if command.command == "transfer":
            sealer = sealer or Sealer(public_key)
            command = ExeCommand("transfer", {"sealed": sealer.seal(encode(dict(command.args)), aad)})
        out.append(command)
    return out


def open_command(args: Mapping[str, Any], unseal: Callable[[bytes, bytes], bytes], aad: bytes) -> dict[str, Any]:
    """The arguments of a sealed ``transfer`` (:func:`seal_command`), opened with ``unseal``.

    A transfer that is not sealed is refused: a requestor's secrets never travel in clear.
    """
    if set(args) != {"sealed"} or not isinstance(args["sealed"], bytes):
        raise ProtocolError("transfer arguments must be sealed to the provider (golem_dask.protocol.sealing)")
    opened = decode(unseal(args["sealed"], aad))
    if not isinstance(opened, dict) or not isinstance(opened.get("from"), str) or not isinstance(opened.get("to"), str):
        raise ProtocolError("a sealed transfer must hold 'from' and 'to' URLs")
    return opened
