"""Pay providers with ERC-20 token transfers on an Ethereum chain.

:class:`EthereumPayer` is the requestor's :class:`~golem_dask.payment.base.Payer` on any
chain a ``web3.Web3`` can reach; :meth:`EthereumPayer.embedded` runs it against the
in-process :class:`~golem_dask.chain.devnet.Devnet`.  It is a short composition of parts
with one job each:

* :class:`~golem_dask.payment.ledger.Ledger`: every debt before money moves;
* :class:`~golem_dask.payment.fees.FeePolicy`: what a transaction offers for gas;
* :class:`~golem_dask.payment.sender.Sender`: signs, sends, replaces and confirms, owning the nonces;
* :class:`~golem_dask.payment.reconciler.Reconciler`: settles what a crash left in flight;
* :class:`~golem_dask.payment.batcher.Batcher`: one transaction for many providers.

web3's calls block, so they run in worker threads (``asyncio.to_thread``); the event
loop that drives the dask cluster never waits on the chain.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Union, cast

from golem_dask import config
from golem_dask.chain.devnet import Devnet
from golem_dask.chain.units import address as checked_address
from golem_dask.chain.units import from_wei, to_wei
from golem_dask.errors import ConfigError, PaymentError
from golem_dask.payment.base import Payer, Transfer
from golem_dask.payment.batcher import Gathering
from golem_dask.payment.connection import Connection
from golem_dask.payment.fees import GWEI, FeePolicy
from golem_dask.payment.ledger import OWED, PAID, Debt, Ledger, PaymentRecord
from golem_dask.payment.session import LazySession
from golem_dask.protocol.identity import Wallet

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress
    from web3 import Web3
    from web3.contract import Contract

__all__ = ["DEVNET_PLATFORM", "EthereumPayer"]

logger = logging.getLogger(__name__)

#: Platform name of the embedded devnet's test token.
DEVNET_PLATFORM = "erc20-devnet-glm"

#: What a payer can be pointed at: a connected ``Web3``, a ``Devnet``, or a zero-argument
#: callable returning either, called on first use (``Devnet.shared`` is one).
ChainSource = Union["Web3", Devnet, Callable[[], Union["Web3", Devnet]]]


class EthereumPayer(Payer):
    """Transfers ERC-20 tokens from the requestor's wallet to providers.

    Parameters
    ----------
    chain:
        A connected ``web3.Web3``, a :class:`~golem_dask.chain.devnet.Devnet`, or a
        zero-argument callable returning either (called lazily, in a worker thread, on
        first ``start``/``pay``/``balance``).
    wallet:
        The requestor's wallet; it signs every transfer.
    token_address:
        Address of the ERC-20 token contract.  Defaults to the devnet's token when
        ``chain`` is (or yields) a ``Devnet``; required otherwise.
    platform:
        Payment platform name advertised to providers.
    receipt_timeout, poll_interval:
        How long to wait for a receipt before raising ``PaymentError``, and how often to
        look (defaults: ``golem.payment.payment-timeout``, ``receipt-poll-interval``).
    ledger:
        Where debts and payments go (default: in memory; a file for a lasting chain).
    batch_address:
        golem-dask's batch contract; debts owed together are then paid in one
        transaction (a devnet supplies its own).
    batch_window_s, replace_after_s:
        How long debts may gather before a payment, and when a stuck transaction is
        replaced (defaults: ``golem.payment.batch-window`` and ``replace-after``).
    priority_fee_wei, max_fee_wei:
        The fee policy (:class:`~golem_dask.payment.fees.FeePolicy`).
    on_step:
        Called with ``"debt"``, ``"signed"``, ``"sent"``, ``"receipt"`` at each durable step.
    expected_chain_id:
        Refuse a node that is another chain.

    Examples
    --------
    >>> import asyncio
    >>> from decimal import Decimal
    >>> payer = EthereumPayer.embedded(Decimal(100))
    >>> payer  # doctest: +ELLIPSIS
    EthereumPayer(platform='erc20-devnet-glm', address='0x...')
    >>> provider = Wallet.generate().address
    >>> transfer = asyncio.run(payer.pay(provider, Decimal("1.25"), reference="inv-1"))
    >>> transfer.amount_wei
    1250000000000000000
    >>> asyncio.run(payer.balance(provider))
    Decimal('1.25')
    >>> payer.token.functions.balanceOf(provider).call()  # check on chain
    1250000000000000000
    """

    def __init__(
        self,
        chain: ChainSource,
        *,
        wallet: Wallet,
        token_address: str | None = None,
        platform: str = DEVNET_PLATFORM,
        receipt_timeout: float | None = None,
        poll_interval: float | None = None,
        ledger: Ledger | None = None,
        batch_address: str | None = None,
        batch_window_s: float | None = None,
        priority_fee_wei: int = GWEI,
        max_fee_wei: int | None = None,
        replace_after_s: float | None = None,
        on_step: Callable[[str], None] | None = None,
        expected_chain_id: int | None = None,
    ) -> None:
        if not isinstance(wallet, Wallet):
            raise ConfigError(f"wallet must be a golem_dask Wallet, got {type(wallet).__name__}")
        if not isinstance(platform, str) or not platform:
            raise ConfigError("platform must be a non-empty string, e.g. 'erc20-devnet-glm'")
        receipt_timeout = config.seconds("payment.payment-timeout", receipt_timeout)
        poll_interval = config.seconds("payment.receipt-poll-interval", poll_interval)
        if receipt_timeout <= 0 or poll_interval <= 0:
            raise ConfigError("receipt_timeout and poll_interval must be positive")
        self.platform = platform
        self._wallet = wallet
        self._gathering = Gathering(config.seconds("payment.batch-window", batch_window_s))
        self._on_step = on_step
        #: Every debt and payment, written before money moves.
        self.ledger = ledger if ledger is not None else Ledger(":memory:")
        timing = (receipt_timeout, poll_interval, config.seconds("payment.replace-after", replace_after_s))
        self._session = LazySession(chain, (token_address, batch_address, expected_chain_id), wallet, self.ledger,
                                    FeePolicy(priority_fee_wei, max_fee_wei), timing, on_step)
        self._closed = False
        # asyncio locks belong to one event loop; a payer used from two loops (a test
        # suite calling asyncio.run twice) gets one per loop.  Correctness across loops
        # rests on the session's threading lock; these only keep threads from piling up.
        self._pay_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]
        self._pay_locks = weakref.WeakKeyDictionary()

    @classmethod
    def from_config(cls, platform: str | None = None, on_step: Callable[[str], None] | None = None
                    ) -> EthereumPayer:
        """A payer on the chain named by ``golem.payment.*`` config, with the file ledger
        (:func:`~golem_dask.payment.factory.payer_from_config`)."""
        from golem_dask.payment.factory import payer_from_config

        return payer_from_config(platform, on_step)

    @classmethod
    def embedded(cls, budget: Decimal, *, eth_wei: int = 10**18, platform: str = DEVNET_PLATFORM) -> EthereumPayer:
        """A payer with a fresh wallet on the process-wide embedded devnet, funded with
        ``budget`` tokens on first use (:func:`~golem_dask.payment.factory.embedded_payer`)."""
        from golem_dask.payment.factory import embedded_payer

        return embedded_payer(budget, eth_wei=eth_wei, platform=platform)

    def fund_on_start(self, tokens: Decimal, eth_wei: int) -> None:
        """Have the devnet mint ``tokens`` and send ``eth_wei`` to this wallet when the chain starts."""
        self._session.funding = (tokens, eth_wei)

    # --- the chain ------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The requestor's checksummed address (known before ``start``)."""
        return self._wallet.address

    @property
    def wallet(self) -> Wallet:
        """The requestor's wallet (it signs market messages too; it never shows its key)."""
        return self._wallet

    @property
    def connection(self) -> Connection:
        """The checked chain connection; starts the chain synchronously if needed."""
        return self._session.get().conn

    @property
    def w3(self) -> Web3:
        """The ``web3.Web3`` this payer uses (on the embedded devnet, hold ``connection.lock``)."""
        return self.connection.w3

    @property
    def token(self) -> Contract:
        """The token's web3 contract object; starts the chain synchronously if needed."""
        return self.connection.token

    @property
    def token_address(self) -> str:
        """The token contract's checksummed address; starts the chain if needed."""
        return self.connection.token_address

    @property
    def chain_id(self) -> int:
        """The chain id; starts the chain if needed."""
        return self.connection.chain_id

    async def start(self) -> None:
        """Connect to the chain and, for an embedded payer, fund the wallet (PaymentError if
        either fails)."""
        await self._ensure_started()

    async def close(self) -> None:
        """Stop accepting payments.  Idempotent; the shared devnet stays up."""
        if not self._closed:
            self._closed = True
            logger.debug("payer %s closed", self.address)

    async def _ensure_started(self) -> None:
        if self._closed:
            raise PaymentError(f"{self!r} is closed; create a new payer to pay again")
        if not self._session.started:
            await asyncio.to_thread(self._session.get)

    def _pay_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._pay_locks.get(loop)
        if lock is None:
            lock = self._pay_locks[loop] = asyncio.Lock()
        return lock

    # --- paying ---------------------------------------------------------------------

    async def pay(self, payee: str, amount: Decimal, *, reference: str, agreement_id: str | None = None) -> Transfer:
        """Owe ``amount`` tokens to ``payee`` and pay it, batched with other debts.

        The debt is written to the ledger before anything is signed; then every debt
        owed at that moment (after a short batching window, so that workers retired
        together share one transaction) is paid, and this returns once the payment
        holding this debt is confirmed with the token's ``Transfer`` event.

        Parameters
        ----------
        payee:
            The provider's address.
        amount:
            Token units (``Decimal`` or ``int``; positive, at most 18 decimals).
        reference:
            Invoice id: one invoice is one debt, however often ``pay`` is called.

        Raises
        ------
        PaymentError
            If the amount or payee is invalid, the requestor cannot cover the amount or
            the gas, or the chain failed.  The debt stays in the ledger (owed, or paying
            when a transaction is in flight) for ``settle`` or ``golem-dask pay``.

        Examples
        --------
        >>> import asyncio
        >>> from decimal import Decimal
        >>> payer = EthereumPayer.embedded(Decimal(5))
        >>> payee = Wallet.generate().address
        >>> t = asyncio.run(payer.pay(payee, Decimal("0.5"), reference="inv-7"))
        >>> t.tx_hash.startswith("0x"), t.amount_wei
        (True, 500000000000000000)
        """
        payee = checked_address(payee, "payee")
        wei = _amount_wei(amount)
        # The debt is written first, even if the chain is unreachable right now.
        debt = await asyncio.to_thread(
            self.ledger.add_debt, reference, agreement_id or reference, self.address, payee, wei, self.platform
        )
        if debt.payee != payee or debt.amount_wei != wei:
            raise PaymentError(f"invoice {reference} is already owed with other terms ({debt.payee}, {debt.amount})")
        self._gathering.arrived()
        if self._on_step is not None:
            self._on_step("debt")
        await self._ensure_started()
        await self._settle(for_debt=debt.id)
        debt = await asyncio.to_thread(self.ledger.debt, debt.id)
        if debt.status != PAID or debt.payment_id is None:
            cause = self._session.get().errors.pop(debt.id, None)
            raise PaymentError(
                f"payment of {amount} tokens to {payee} (reference {reference}) is still {debt.status}"
                + (f": {cause}" if cause else "")
                + "; the debt stays in the ledger: 'golem-dask pay' settles it once this is fixed"
            )
        record = await asyncio.to_thread(self.ledger.payment, debt.payment_id)
        assert record.confirmed_hash is not None and record.block_number is not None
        return Transfer(payee=payee, amount_wei=wei, tx_hash=record.confirmed_hash, block_number=record.block_number)

    def linger(self, seconds: float, debts: int) -> None:
        """Gather payments for up to ``seconds`` before each batch from now on, or until
        ``debts`` more are owed (a closing cluster's final invoices arrive over a moment)."""
        self._gathering.expect(debts, seconds)

    async def settle(self) -> list[PaymentRecord]:
        """Reconcile unfinished payments with the chain, then pay every owed debt.

        Returns the payments confirmed by this call.  Safe to call concurrently (one
        runs at a time) and after a crash (reconciling comes first).
        """
        return await self._settle()

    async def _settle(self, for_debt: str | None = None) -> list[PaymentRecord]:
        await self._ensure_started()
        async with self._pay_lock():
            if for_debt is not None and (await asyncio.to_thread(self.ledger.debt, for_debt)).status != OWED:
                return []  # the settle before ours paid it (or has it in flight): nothing to wait for
            await self._gathering.wait()  # let concurrent debts join
            return await asyncio.to_thread(self._session.get().settle)

    def owed(self) -> list[Debt]:
        """Debts of this payer not yet paid."""
        return [d for d in self.ledger.debts() if d.payer == self.address and d.status != PAID]

    # --- queries --------------------------------------------------------------------

    async def balance(self, address: str) -> Decimal:
        """Token balance of ``address``, in token units.

        Examples
        --------
        >>> import asyncio
        >>> from decimal import Decimal
        >>> payer = EthereumPayer.embedded(Decimal("7.5"))
        >>> asyncio.run(payer.balance(payer.address))
        Decimal('7.5')
        """
        address = checked_address(address)
        wei = await self._read(f"reading the token balance of {address}",
                               lambda conn: conn.token.functions.balanceOf(address).call())
        return from_wei(int(wei))

    async def eth_balance(self, address: str) -> int:
        """ETH balance of ``address``, in wei (what is left for gas).

        Examples
        --------
        >>> import asyncio
        >>> from decimal import Decimal
        >>> payer = EthereumPayer.embedded(Decimal(1), eth_wei=10**17)
        >>> asyncio.run(payer.eth_balance(payer.address))
        100000000000000000
        """
        address = checked_address(address)
        return int(await self._read(f"reading the ETH balance of {address}", lambda conn: conn.w3.eth.get_balance(cast("ChecksumAddress", address))))

    async def _read(self, what: str, fn: Callable[[Connection], Any]) -> Any:
        await self._ensure_started()
        conn = self.connection
        return await asyncio.to_thread(conn.call, self.address, what, lambda: fn(conn))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(platform={self.platform!r}, address={self.address!r})"


def _amount_wei(amount: Decimal) -> int:
    if isinstance(amount, float) or not isinstance(amount, Decimal | int):
        raise TypeError(
            f"amount must be a Decimal or int, got {type(amount).__name__} "
            "(floats cannot represent token amounts exactly)"
        )
    amount = Decimal(amount)
    if not amount.is_finite() or amount <= 0:
        raise PaymentError(f"payment amount must be a positive number of tokens, got {amount}")
    try:
        wei = to_wei(amount)
    except ValueError as e:
        raise PaymentError(f"cannot pay {amount} tokens: {e}") from e
    if wei >= 2**256:
        raise PaymentError(f"payment amount {amount} does not fit in a uint256")
    return wei
