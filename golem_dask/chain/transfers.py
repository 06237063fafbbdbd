"""Reading token transfers out of a transaction: "did tx T move amount A from X to Y".

One question, asked by both sides: the requestor's payer before it marks debts paid (and
when it reconciles its ledger after a crash), the provider before it counts an invoice
as paid.  Only ``Transfer`` events emitted by the token contract itself count: any
contract can emit an event with the same signature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TokenTransfer", "missing", "token_transfers"]


@dataclass(frozen=True, slots=True)
class TokenTransfer:
    """One ``Transfer(sender, receiver, value)`` event of the token, value in wei."""

    sender: str
    receiver: str
    value_wei: int


def token_transfers(token: Any, receipt: Any) -> list[TokenTransfer]:
    """The token's ``Transfer`` events in ``receipt`` (a web3 receipt), in log order.

    ``token`` is the web3 contract object of the token.  Events of other contracts, and
    logs that do not decode as ``Transfer``, are left out.
    """
    from web3.logs import DISCARD

    return [
        TokenTransfer(str(e["args"]["sender"]), str(e["args"]["receiver"]), int(e["args"]["value"]))
        for e in token.events.Transfer().process_receipt(receipt, errors=DISCARD)
        if e["address"] == token.address
    ]


def missing(transfers: Iterable[TokenTransfer], payer: str, expected: Sequence[tuple[str, int]]
            ) -> list[tuple[str, int]]:
    """The ``(payee, wei)`` pairs of ``expected`` that no transfer from ``payer`` matches.

    Each transfer matches one pair at most, so two equal debts need two transfers.

    Examples
    --------
    >>> t = [TokenTransfer("0xA", "0xB", 5), TokenTransfer("0xA", "0xC", 7)]
    >>> missing(t, "0xA", [("0xB", 5), ("0xB", 5), ("0xC", 7)])
    [('0xB', 5)]
    >>> missing(t, "0xZ", [("0xB", 5)])
    [('0xB', 5)]
    """
    seen = [(t.receiver, t.value_wei) for t in transfers if t.sender == payer]
    left = []
    for pair in expected:
        if pair in seen:
            seen.remove(pair)
        else:
            left.append(pair)
    return left
