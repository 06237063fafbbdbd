"""Paying several providers in one transaction through the batch contract.

Debts owed at the same moment are grouped (at most :data:`BATCH_MAX` a transaction, the
contract's limit); a group of one is a plain ``transfer``, a larger group one
``batchTransferFrom`` with one packed word per payee.  The batch contract moves tokens
from the payer with ``transferFrom``, so the payer approves it once, for good.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from golem_dask.chain.units import from_wei
from golem_dask.errors import PaymentError
from golem_dask.payment.ledger import Debt, PaymentRecord
from golem_dask.payment.sender import Sender

#: Payees per batch transaction (the batch contract's limit).
BATCH_MAX = 256


class Gathering:
    """How long a settle waits for other debts to join its batch: ``window_s``, and no
    longer once the debts :meth:`expect` announced have all arrived.

    Examples
    --------
    >>> async def closing():
    ...     g = Gathering(0.0)
    ...     g.expect(2, window_s=5.0)
    ...     loop = asyncio.get_running_loop()
    ...     loop.call_later(0.01, g.arrived); loop.call_later(0.02, g.arrived)
    ...     started = loop.time()
    ...     await g.wait()
    ...     return loop.time() - started < 1
    >>> asyncio.run(closing())
    True
    """

    def __init__(self, window_s: float | None) -> None:
        self.window_s = window_s or 0.0
        self._expected = 0
        self._arrived = 0
        self._arrival: asyncio.Event | None = None

    def expect(self, debts: int, window_s: float) -> None:
        """From now on gather for up to ``window_s``, until ``debts`` more have arrived."""
        self.window_s = max(self.window_s, window_s)
        self._expected, self._arrived = debts, 0

    def arrived(self) -> None:
        self._arrived += 1
        if self._arrival is not None:
            self._arrival.set()

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while not (self._expected and self._arrived >= self._expected) and loop.time() < deadline:
            self._arrival = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), deadline - loop.time())


def pack_payment(debt: Debt) -> int:
    """One batch-contract word: ``amount << 160 | payee``.

    Examples
    --------
    >>> from golem_dask.payment.ledger import Debt
    >>> d = Debt("d", "i", "a", "0x" + "11" * 20, "0x" + "00" * 19 + "02", 5, "p", "owed", None, 0)
    >>> hex(pack_payment(d))
    '0x50000000000000000000000000000000000000002'
    """
    if debt.amount_wei >= 1 << 96:
        raise PaymentError(f"{debt.amount} tokens is too much for one batch entry; pay it on its own")
    return (debt.amount_wei << 160) | int(debt.payee, 16)


class Batcher:
    """Turns owed debts into as few payment transactions as the chain allows."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    @property
    def batching(self) -> bool:
        return self.sender.conn.batch is not None

    def groups(self, owed: list[Debt]) -> list[list[Debt]]:
        """One group per transaction: batches when a batch contract is known, else singles."""
        if self.batching and len(owed) > 1:
            return [owed[i:i + BATCH_MAX] for i in range(0, len(owed), BATCH_MAX)]
        return [[debt] for debt in owed]

    def pay(self, group: list[Debt]) -> PaymentRecord:
        """Pay one group in one transaction and see it confirmed."""
        conn = self.sender.conn
        if len(group) == 1:
            (d,) = group
            call = conn.token.functions.transfer(d.payee, d.amount_wei)
            what = f"payment of {d.amount} tokens to {d.payee} (reference {d.invoice_id})"
            return self.sender.submit("transfer", group, call, what)
        assert conn.batch is not None
        self._ensure_allowance(sum(d.amount_wei for d in group))
        call = conn.batch.functions.batchTransferFrom(conn.token_address, [pack_payment(d) for d in group])
        total = from_wei(sum(d.amount_wei for d in group))
        what = (f"batch payment of {total} tokens to {len(group)} payees "
                f"(references {', '.join(d.invoice_id for d in group)})")
        return self.sender.submit("batch", group, call, what)

    def _ensure_allowance(self, wei: int) -> None:
        conn, sender = self.sender.conn, self.sender
        assert conn.batch is not None
        with conn.lock:
            allowance = int(conn.token.functions.allowance(sender.address, conn.batch.address).call())
        if allowance < wei:
            # Once, for good: the batch contract holds nothing and can only move tokens
            # from the account that calls it.
            call: Any = conn.token.functions.approve(conn.batch.address, 2**256 - 1)
            sender.submit("approve", [], call, "approving the batch contract")
