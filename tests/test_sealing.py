"""Secrets sealed to one provider: only its key opens them, only for the activity they name."""

from __future__ import annotations

import dataclasses

import pytest

from golem_dask.errors import ProtocolError
from golem_dask.protocol import properties as P
from golem_dask.protocol.identity import Wallet, address_of
from golem_dask.protocol.messages import Agreement, ExeCommand, Proposal
from golem_dask.protocol.sealing import activity_aad, open_command, provider_key, seal, seal_command
from golem_dask.protocol.wire import encode

SECRET = {"from": "s3://bucket/data.csv?X-Amz-Signature=abc", "to": "/golem/input/data.csv",
          "options": {"key": "AKIA-SECRET-KEY-ID", "secret": "wJalrXUtnFEMI-SECRET"}}


def test_only_the_provider_opens_and_only_for_its_activity() -> None:
    provider, other = Wallet.generate(), Wallet.generate()
    aad = activity_aad("agreement-1", "activity-1")
    command = seal_command(ExeCommand("transfer", SECRET), provider.public_key, aad)
    blob = command.args["sealed"]
    for needle in (b"AKIA-SECRET-KEY-ID", b"wJalrXUtnFEMI-SECRET", b"X-Amz-Signature", b"bucket"):
        assert needle not in blob and needle not in encode(command)
    assert open_command(command.args, provider.unseal, aad) == SECRET
    with pytest.raises(ProtocolError, match="does not open"):
        open_command(command.args, other.unseal, aad)
    with pytest.raises(ProtocolError, match="does not open"):
        open_command(command.args, provider.unseal, activity_aad("agreement-1", "activity-2"))
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError, match="does not open"):
        provider.unseal(bytes(tampered), aad)
    for malformed in (b"", b"\x02" + blob[1:], blob[:40]):
        with pytest.raises(ProtocolError):
            provider.unseal(malformed, aad)


def test_a_transfer_in_clear_is_refused_by_the_provider() -> None:
    provider = Wallet.generate()
    with pytest.raises(ProtocolError, match="must be sealed"):
        open_command(SECRET, provider.unseal, b"aad")
    with pytest.raises(ProtocolError, match="must be sealed"):
        open_command({"sealed": b"x", "from": "file:///etc/passwd"}, provider.unseal, b"aad")


def test_other_commands_are_left_alone() -> None:
    run = ExeCommand("run", {"entry_point": "dask", "args": ["worker"]})
    assert seal_command(run, Wallet.generate().public_key, b"aad") is run


def test_the_key_must_be_the_providers_own() -> None:
    provider, mallory = Wallet.generate(), Wallet.generate()
    assert address_of(provider.public_key) == provider.address

    def agreement(key: bytes | None) -> Agreement:
        props = {} if key is None else {P.NODE_PUBKEY: "0x" + key.hex()}
        offer = Proposal("provider", props, "(&)", "o", "d", provider.address)
        return Agreement("a", dataclasses.replace(offer, issuer="requestor"), offer, mallory.address,
                         provider.address, 1)

    assert provider_key(agreement(provider.public_key)) == provider.public_key
    with pytest.raises(ProtocolError, match="is not its own"):
        provider_key(agreement(mallory.public_key))  # a hub or a copy of the offer swapped the key
    with pytest.raises(ProtocolError, match="states no public key"):
        provider_key(agreement(None))


def test_seal_to_a_non_key_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not a secp256k1 public key"):
        seal(b"\x02" + b"\x00" * 32, b"x", b"aad")
