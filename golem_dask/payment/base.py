"""The ``Payer`` seam: how the requestor's money moves.

A payer knows one payment platform (for example ``erc20-devnet-glm``), holds the
requestor's wallet, and transfers token amounts to providers' addresses.  The accountant
decides *what* is owed; the payer only moves it.  Amounts cross this seam as ``Decimal``
token units; implementations convert to integer wei exactly
(:mod:`golem_dask.chain.units`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from decimal import Decimal

@dataclass(frozen=True, slots=True)
class Transfer:
    """One token transfer that made it into a block."""

    payee: str
    amount_wei: int
    tx_hash: str
    block_number: int


class Payer(abc.ABC):
    """Moves the requestor's tokens to providers.

    Implementations must be safe to ``close()`` twice and must never put the
    requestor's private key into a log line, a repr or an exception message.
    """

    #: Payment platform name, as in ``golem.com.payment.platform.<platform>.address``.
    platform: str

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The requestor's checksummed payment address (known before ``start``)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect to the chain.  May be lazy: ``pay`` starts what it needs."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections.  Safe to call twice."""

    @abc.abstractmethod
    async def pay(self, payee: str, amount: Decimal, *, reference: str, agreement_id: str | None = None) -> Transfer:
        """Transfer ``amount`` tokens to ``payee`` and wait for the receipt.

        ``reference`` (an invoice or debit note id) goes into logs so a payment can be
        traced; ``agreement_id`` ties it to its agreement in a ledger.
        Raises :class:`~golem_dask.errors.PaymentError` when the transfer fails.
        """

    @abc.abstractmethod
    async def balance(self, address: str) -> Decimal:
        """The token balance of ``address``."""
