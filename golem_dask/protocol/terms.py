"""Agreements both sides can prove: one digest of the terms, signed by each party.

The terms are everything an agreement binds: its id, the requestor's demand proposal, the
provider's offer proposal (with its prices), both parties and the expiry.  The requestor
signs them before asking for approval; the provider checks that signature, signs the same
digest and returns the agreement; the requestor checks that the provider signed exactly
the terms it proposed.  State changes (approved, terminated) are not terms and are not
signed.

Examples
--------
>>> from golem_dask.protocol.identity import Wallet
>>> from golem_dask.protocol.messages import Agreement, Issuer, Proposal
>>> requestor, provider = Wallet.from_key("11" * 32), Wallet.from_key("22" * 32)
>>> demand = Proposal(Issuer.REQUESTOR, {}, "(&)", "o1", "d1", provider.address, id="p1")
>>> offer = Proposal(Issuer.PROVIDER, {}, "(&)", "o1", "d1", provider.address, "p1", id="p2")
>>> agreement = sign(Agreement("a1", demand, offer, requestor.address, provider.address, 10**13), requestor)
>>> check(sign(agreement, provider), "provider")
>>> check(agreement, "provider")
Traceback (most recent call last):
...
golem_dask.errors.ProtocolError: agreement a1 is not signed by its provider
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from golem_dask.errors import ProtocolError
from golem_dask.protocol.identity import Wallet, keccak256, signer_of
from golem_dask.protocol.messages import Agreement
from golem_dask.protocol.wire import encode

Role = Literal["requestor", "provider"]

#: Signed digests start with this, so an agreement signature is never an envelope's or a transaction's.
_DOMAIN = b"golem-dask agreement terms\x00"


def digest(agreement: Agreement) -> bytes:
    """The 32-byte keccak-256 of the agreement's terms (its state and signatures left out)."""
    terms = [agreement.id, agreement.demand, agreement.offer, agreement.requestor_id, agreement.provider_id,
             agreement.valid_to_ms]
    return keccak256(_DOMAIN + encode(terms))


def sign(agreement: Agreement, wallet: Wallet) -> Agreement:
    """``agreement`` with ``wallet``'s signature of its terms, in the requestor's or the
    provider's place (whichever party the wallet is).

    Raises
    ------
    ProtocolError
        If the wallet is neither party.
    """
    signature = wallet.sign_message_hash(digest(agreement))
    if wallet.address == agreement.requestor_id:
        return dataclasses.replace(agreement, requestor_signature=signature)
    if wallet.address == agreement.provider_id:
        return dataclasses.replace(agreement, provider_signature=signature)
    raise ProtocolError(f"{wallet.address} is not a party to agreement {agreement.id}")


def check(agreement: Agreement, role: Role) -> None:
    """Raise ProtocolError unless ``role``'s party signed exactly these terms."""
    party = agreement.requestor_id if role == "requestor" else agreement.provider_id
    signature = agreement.requestor_signature if role == "requestor" else agreement.provider_signature
    if not signature:
        raise ProtocolError(f"agreement {agreement.id} is not signed by its {role}")
    signer = signer_of(digest(agreement), signature)
    if signer != party:
        raise ProtocolError(f"agreement {agreement.id} carries a {role} signature by {signer}, not by its "
                            f"{role} {party}: the terms were changed after signing, or it was never signed")
