"""``YagnaPayer``: the payer seam on the user's ``yagna`` daemon.

On the daemon, accepting an invoice (or a debit note) is the order to pay it: the
daemon's payment driver pays accepted documents in batch cycles from the allocation
(every few minutes on testnets, once a day on Polygon mainnet).  A cluster that scales
down or closes does not wait for the next cycle: :meth:`YagnaPayer.pay` runs the cycle
for the platform at once (``POST /payment-api/v1/batchCycle/{platform}/now``) and waits,
bounded by ``golem.payment.payment-timeout``, until the daemon reports payments for the
agreement covering the amount; the bill gets the transaction hash the daemon reports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from golem_dask import config
from golem_dask.chain.units import to_wei
from golem_dask.errors import MarketError, PaymentError
from golem_dask.payment.base import Payer, Transfer
from golem_dask.yagna import convert
from golem_dask.yagna.api import YagnaDaemon, iso

logger = logging.getLogger(__name__)


def paid_for(payments: Iterable[Mapping[str, Any]], agreement_id: str, activity_ids: Iterable[str],
             payee: str) -> tuple[Decimal, str | None]:
    """What ``payments`` paid ``payee`` for an agreement (its own share and its
    activities'), and the transaction hash of the last of them.

    Examples
    --------
    >>> payments = [{"payeeAddr": "0xab", "details": None, "agreementPayments": [],
    ...              "activityPayments": [{"activityId": "a1", "amount": "0.5"}]},
    ...             {"payeeAddr": "0xab", "details": None,
    ...              "agreementPayments": [{"agreementId": "g", "amount": "0.75"}], "activityPayments": []}]
    >>> paid_for(payments, "g", ["a1"], "0xAB")
    (Decimal('1.25'), None)
    """
    activities = set(activity_ids)
    total, last = Decimal(0), None
    for payment in payments:
        if str(payment.get("payeeAddr", "")).lower() != payee.lower():
            continue
        shares = [p for p in payment.get("agreementPayments") or () if p.get("agreementId") == agreement_id]
        shares += [p for p in payment.get("activityPayments") or () if p.get("activityId") in activities]
        if shares:
            total += sum((convert.decimal(p.get("amount"), "payment amount") for p in shares), Decimal(0))
            last = convert.tx_hash(payment.get("details")) or last
    return total, last


class YagnaPayer(Payer):
    """Payments through the daemon: it holds the requestor's key, golem-dask never does."""

    def __init__(self, daemon: YagnaDaemon) -> None:
        self.daemon = daemon
        self.platform = daemon.platform
        self._started = False

    def __repr__(self) -> str:
        return f"YagnaPayer({self.daemon.api.url!r}, {self.address}, {self.platform!r})"

    @property
    def address(self) -> str:
        return self.daemon.identity

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.daemon.start()

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self.daemon.close()

    async def pay(self, payee: str, amount: Decimal, *, reference: str, agreement_id: str | None = None) -> Transfer:
        """Wait until the daemon has paid ``amount`` for the agreement (its accepted debit
        notes and invoice), running its payment cycle first.

        Raises
        ------
        PaymentError
            If the daemon reports no such payment within ``golem.payment.payment-timeout``;
            the accepted documents stay with the daemon, which pays them in a later cycle.
        """
        await self.start()
        if agreement_id is None:
            raise PaymentError(f"paying {reference} through yagna needs its agreement")
        await self.daemon.run_cycle()
        loop = asyncio.get_running_loop()
        timeout = config.seconds("payment.payment-timeout")
        deadline = loop.time() + timeout
        activities = self.daemon.activities.get(agreement_id, [])
        paid, tx = Decimal(0), None
        cycled = loop.time()
        while loop.time() < deadline:
            try:
                asked = loop.time()
                found = await self.daemon.api.call("GET", "/payment-api/v1/payments",
                                                   params={"afterTimestamp": iso(self.daemon.since)})
            except MarketError as e:
                logger.info("asking the daemon for payments: %s", e)
                found = []
            paid, tx = paid_for(found if isinstance(found, list) else [], agreement_id, activities, payee)
            logger.debug("%s: the daemon has paid %s of %s (asked in %.2fs)", reference, paid, amount,
                         loop.time() - asked)
            if paid >= amount and tx is not None:
                logger.info("yagna paid %s to %s for %s in %s", paid, payee, reference, tx)
                return Transfer(payee, to_wei(amount), tx, 0)
            if loop.time() - cycled >= 0.25:
                # An accepted debit note is paid in one cycle, the invoice's rest in a later one.
                cycled = loop.time()
                await self.daemon.run_cycle()
            await asyncio.sleep(config.seconds("yagna.payment-poll-interval"))
        raise PaymentError(
            f"the yagna daemon paid {paid} of {amount} to {payee} for {reference} within {timeout:g}s "
            "(golem.payment.payment-timeout); the documents stay accepted and it pays them in a later payment "
            "cycle (see 'yagna payment process info' and 'yagna payment status'); raise the timeout to wait longer")

    async def balance(self, address: str) -> Decimal:
        raise PaymentError("the yagna daemon reports no token balances over its REST API; "
                           "run 'yagna payment status' for the requestor's")
