"""A payer's parts once its chain is connected, and the one routine that settles debts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from golem_dask.errors import ConfigError, GolemDaskError, PaymentError
from golem_dask.payment.batcher import Batcher
from golem_dask.payment.connection import Connection, connect
from golem_dask.payment.fees import FeePolicy
from golem_dask.payment.ledger import OWED, Ledger, PaymentRecord
from golem_dask.payment.reconciler import Reconciler
from golem_dask.payment.sender import Sender
from golem_dask.protocol.identity import Wallet

logger = logging.getLogger(__name__)


class PaymentSession:
    """Sender, reconciler and batcher on one connection; :meth:`settle` uses all three.

    Parameters
    ----------
    conn, wallet, ledger, fees:
        The chain, the key, the record and the fee policy.
    timing:
        ``(receipt_timeout_s, poll_interval_s, replace_after_s)`` for the sender.
    on_step:
        Crash-test hook, see :class:`~golem_dask.payment.sender.Sender`.
    """

    def __init__(self, conn: Connection, wallet: Wallet, ledger: Ledger, fees: FeePolicy,
                 timing: tuple[float, float, float], on_step: Callable[[str], None] | None = None) -> None:
        receipt_timeout, poll_interval, replace_after = timing
        self.conn = conn
        self.ledger = ledger
        self.sender = Sender(conn, wallet, ledger, fees, receipt_timeout_s=receipt_timeout,
                             poll_interval_s=poll_interval, replace_after_s=replace_after, on_step=on_step)
        self.reconciler = Reconciler(self.sender, ledger)
        self.batcher = Batcher(self.sender)
        #: Why the last payment of a debt failed, by debt id (read once by its pay() caller).
        self.errors: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, source: Any, addresses: tuple[str | None, str | None, int | None],
             funding: tuple[Decimal, int] | None, wallet: Wallet, ledger: Ledger, fees: FeePolicy,
             timing: tuple[float, float, float], on_step: Callable[[str], None] | None = None) -> PaymentSession:
        """Connect to ``source`` (see :func:`~golem_dask.payment.connection.connect`), fund
        the wallet on a devnet if ``funding`` says ``(tokens, eth_wei)``, and assemble.

        Raises
        ------
        PaymentError
            If the chain cannot be reached or funding fails; ConfigError if misconfigured.
        """
        try:
            conn = connect(source, *addresses)
            if funding is not None:
                if conn.devnet is None:
                    raise ConfigError("only a payer on a Devnet can fund its own wallet")
                tokens, eth_wei = funding
                logger.info("funding requestor %s on the embedded devnet: %s tokens, %d wei for gas",
                            wallet.address, tokens, eth_wei)
                conn.devnet.fund(wallet.address, tokens, eth_wei)
        except GolemDaskError:
            raise
        except Exception as e:
            raise PaymentError(
                f"could not start the payment chain: {type(e).__name__}: {e}. Check the chain connection "
                "(or, for the embedded devnet, that web3 and eth-tester[py-evm] are installed)"
            ) from e
        return cls(conn, wallet, ledger, fees, timing, on_step)

    def settle(self) -> list[PaymentRecord]:
        """Reconcile what is in flight, then pay every owed debt; returns what got confirmed.

        One payment failing (say, a balance too low for it) does not stop the others;
        its debts stay owed and the reason is kept in :attr:`errors`.
        """
        with self._lock:
            done = self.reconciler.reconcile()
            for group in self.batcher.groups(self.ledger.owed(self.sender.address)):
                try:
                    done.append(self.batcher.pay(group))
                except PaymentError as e:
                    logger.warning("%s", e)
                    if len(group) == 1:
                        self.errors[group[0].id] = str(e)
                        continue
                    # One debt the balance cannot cover must not hold back the others
                    # in its batch: those still owed are paid one by one.
                    for debt in group:
                        if self.ledger.debt(debt.id).status != OWED:
                            self.errors[debt.id] = str(e)
                            continue
                        try:
                            done.append(self.batcher.pay([debt]))
                        except PaymentError as single:
                            self.errors[debt.id] = str(single)
                            logger.warning("%s", single)
            return done


class LazySession:
    """Opens a payer's :class:`PaymentSession` on first use, once, from any thread.

    A payer exists (and knows its address) before its chain is touched: the embedded
    devnet is created and funded at the first payment, not when the cluster starts.
    """

    def __init__(self, source: Any, addresses: tuple[str | None, str | None, int | None], wallet: Wallet,
                 ledger: Ledger, fees: FeePolicy, timing: tuple[float, float, float],
                 on_step: Callable[[str], None] | None = None) -> None:
        self._args = (source, addresses)
        self._parts = (wallet, ledger, fees, timing, on_step)
        #: ``(tokens, eth_wei)`` the devnet mints and sends to the wallet when the session opens.
        self.funding: tuple[Decimal, int] | None = None
        self._session: PaymentSession | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._session is not None

    def get(self) -> PaymentSession:
        """The session, opened now if it was not (blocking: call it in a thread from async code)."""
        session = self._session
        if session is not None:
            return session
        with self._lock:
            if self._session is None:
                source, addresses = self._args
                self._session = PaymentSession.open(source, addresses, self.funding, *self._parts)
                self.funding = None
                logger.debug("payer %s started on chain %d", self._parts[0].address, self._session.conn.chain_id)
            return self._session
