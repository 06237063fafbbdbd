"""Pay providers with ERC-20 token transfers on an Ethereum chain.

:class:`EthereumPayer` signs ``transfer`` transactions with the requestor's
:class:`~golem_dask.payment.wallet.Wallet`, broadcasts them, waits for the receipt and
checks the token's ``Transfer`` event before reporting a payment as made.  It works on
any chain a ``web3.Web3`` can reach; :meth:`EthereumPayer.embedded` runs it against the
in-process :class:`~golem_dask.payment.devnet.Devnet`.

web3's calls block, so they run in worker threads (``asyncio.to_thread``); the event
loop that drives the dask cluster never waits on the chain.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar, Union, cast

from golem_dask.errors import ConfigError, GolemDaskError, PaymentError
from golem_dask.payment.base import Payer, Transfer, from_wei, to_wei
from golem_dask.payment.devnet import Devnet
from golem_dask.payment.ledger import PAID, Debt, Ledger, PaymentRecord
from golem_dask.payment.wallet import Wallet

if TYPE_CHECKING:
    from web3 import Web3
    from eth_typing import ChecksumAddress
    from hexbytes import HexBytes
    from web3.contract import Contract
    from web3.types import TxParams

__all__ = ["EthereumPayer", "DEVNET_PLATFORM"]

logger = logging.getLogger(__name__)

#: Platform name of the embedded devnet's test token.
DEVNET_PLATFORM = "erc20-devnet-glm"

#: What a payer can be pointed at: a connected ``Web3``, a ``Devnet``, or a zero-argument
#: callable returning either, called on first use (``Devnet.shared`` is one).
ChainSource = Union["Web3", Devnet, Callable[[], Union["Web3", Devnet]]]

_T = TypeVar("_T")
#: Payees per batch transaction (the batch contract's limit).
_BATCH_MAX = 256
_GWEI = 10**9


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


@dataclass(slots=True)
class _LoopLocks:
    # asyncio locks belong to one event loop; a payer used from two loops (a test
    # suite calling asyncio.run twice) gets a pair per loop.  Correctness across loops
    # rests on the threading locks; these only keep worker threads from piling up.
    start: asyncio.Lock
    pay: asyncio.Lock


class EthereumPayer(Payer):
    """Transfers ERC-20 tokens from the requestor's wallet to providers.

    Parameters
    ----------
    chain:
        A connected ``web3.Web3``, a :class:`~golem_dask.payment.devnet.Devnet`, or a
        zero-argument callable returning either (called lazily, in a worker thread, on
        first ``start``/``pay``/``balance``).
    wallet:
        The requestor's wallet; it signs every transfer.
    token_address:
        Address of the ERC-20 token contract.  Defaults to the devnet's token when
        ``chain`` is (or yields) a ``Devnet``; required otherwise.
    platform:
        Payment platform name advertised to providers.
    receipt_timeout:
        Seconds to wait for a transaction's receipt before raising ``PaymentError``.
    poll_interval:
        Seconds between receipt polls on chains that do not mine instantly.

    Attributes
    ----------
    platform:
        The payment platform name.
    w3:
        The ``web3.Web3`` (starts the chain synchronously on first access).
    token:
        The web3 contract object of the token (starts the chain likewise).

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
        receipt_timeout: float = 120.0,
        poll_interval: float = 0.2,
        ledger: Ledger | None = None,
        batch_address: str | None = None,
        batch_window_s: float = 0.1,
        priority_fee_wei: int = _GWEI,
        max_fee_wei: int | None = None,
        replace_after_s: float = 60.0,
        on_step: Callable[[str], None] | None = None,
        expected_chain_id: int | None = None,
    ) -> None:
        if not isinstance(wallet, Wallet):
            raise ConfigError(f"wallet must be a golem_dask Wallet, got {type(wallet).__name__}")
        if not isinstance(platform, str) or not platform:
            raise ConfigError("platform must be a non-empty string, e.g. 'erc20-devnet-glm'")
        if receipt_timeout <= 0 or poll_interval <= 0:
            raise ConfigError("receipt_timeout and poll_interval must be positive")
        self.platform = platform
        self._wallet = wallet
        self._chain_source = chain
        self._token_address_arg = token_address
        self._receipt_timeout = float(receipt_timeout)
        self._poll_interval = float(poll_interval)
        # Set by ``embedded``: (tokens, eth_wei) minted to the wallet when the devnet
        # starts.
        self._funding: tuple[Decimal, int] | None = None

        self._w3: Web3 | None = None
        self._token: Contract | None = None
        self._token_address: str | None = None
        self._chain_id: int | None = None
        # Every web3 call holds this lock; for a devnet it is the devnet's own lock, so
        # all payers sharing a chain are serialised against each other.
        self._chain_lock: Any = threading.RLock()
        self._start_lock = threading.Lock()
        self._send_lock = threading.Lock()
        #: Every debt and payment, written before money moves (in memory by default:
        #: pass a file-backed Ledger for a chain that outlives this process).
        self.ledger = ledger if ledger is not None else Ledger(":memory:")
        self._batch_address_arg = batch_address
        self._batch: Contract | None = None
        self._batch_window_s = float(batch_window_s)
        self._priority_fee_wei = int(priority_fee_wei)
        self._max_fee_wei = None if max_fee_wei is None else int(max_fee_wei)
        self._replace_after_s = float(replace_after_s)
        # Called with "debt", "signed", "sent", "receipt" as a payment passes each
        # durable step (crash tests stop the process there).
        self._on_step = on_step
        self._errors: dict[str, str] = {}
        self._expected_chain_id = expected_chain_id
        self._started = False
        self._closed = False
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopLocks]
        self._loop_locks = weakref.WeakKeyDictionary()

    @classmethod
    def from_config(
        cls, platform: str | None = None, on_step: Callable[[str], None] | None = None
    ) -> EthereumPayer:
        """A payer on the chain named by ``golem.payment.*`` config, with a file ledger.

        Examples
        --------
        >>> import dask
        >>> with dask.config.set({"golem.payment.rpc-url": None}):  # doctest: +ELLIPSIS
        ...     EthereumPayer.from_config()
        Traceback (most recent call last):
        ...
        golem_dask.errors.ConfigError: golem.payment.rpc-url is not set; ...
        """
        import os

        from golem_dask import config

        url = config.get("payment.rpc-url")
        if not url:
            raise ConfigError("golem.payment.rpc-url is not set; set it (or DASK_GOLEM__PAYMENT__RPC_URL) to the "
                              "chain's JSON-RPC URL, or leave it unset for the embedded devnet")
        token = config.address("payment.token-address")
        if not token:
            raise ConfigError("golem.payment.token-address is not set: the ERC-20 token to pay with")
        keystore = config.get("payment.keystore")
        if keystore:
            wallet = Wallet.from_keystore(os.path.expanduser(keystore), config.get("payment.keystore-password-env"))
        else:
            wallet = Wallet.from_env(config.get("payment.key-env"))
        from web3 import HTTPProvider, Web3

        timeout = config.seconds("payment.payment-timeout")
        w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": min(timeout, 30.0)}))
        chain_id = config.get("payment.chain-id")
        return cls(
            w3,
            wallet=wallet,
            token_address=token,
            batch_address=config.address("payment.batch-address"),
            platform=platform or config.get("payment.platform"),
            receipt_timeout=timeout,
            ledger=Ledger(os.path.join(os.path.expanduser(config.get("payment.data-dir")), "ledger.sqlite")),
            batch_window_s=config.seconds("payment.batch-window"),
            priority_fee_wei=int(Decimal(str(config.get("payment.priority-fee-gwei"))) * _GWEI),
            max_fee_wei=int(Decimal(str(config.get("payment.max-fee-gwei"))) * _GWEI),
            replace_after_s=config.seconds("payment.replace-after"),
            expected_chain_id=None if chain_id is None else int(chain_id),
            on_step=on_step,
        )

    @classmethod
    def embedded(
        cls,
        budget: Decimal,
        *,
        eth_wei: int = 10**18,
        platform: str = DEVNET_PLATFORM,
    ) -> EthereumPayer:
        """A payer with a fresh wallet on the process-wide embedded devnet.

        The wallet is generated now, so :attr:`address` is known at once; the chain is
        created (:meth:`Devnet.shared`) and the wallet funded with ``budget`` tokens and
        ``eth_wei`` wei of ETH lazily, on the first ``start``/``pay``/``balance``.

        Parameters
        ----------
        budget:
            Tokens to mint to the requestor (``Decimal``, ``int`` or decimal ``str``).
        eth_wei:
            ETH for gas, in wei.  1 ETH pays for ~20,000 transfers on the devnet.
        platform:
            Payment platform name.

        Raises
        ------
        ConfigError
            If ``budget`` is negative, a float, or finer than one wei.

        Examples
        --------
        >>> from decimal import Decimal
        >>> payer = EthereumPayer.embedded(Decimal("50"))
        >>> payer.address.startswith("0x")
        True
        """
        if isinstance(budget, float) or not isinstance(budget, Decimal | int | str):
            raise ConfigError(
                f"budget must be a Decimal, int or decimal string, got {type(budget).__name__}"
                " (floats cannot represent token amounts exactly)"
            )
        try:
            tokens = Decimal(budget)
            to_wei(tokens)
        except (ValueError, ArithmeticError) as e:
            raise ConfigError(f"budget {budget!r} is not a valid token amount: {e}") from None
        if not tokens.is_finite() or tokens < 0:
            raise ConfigError(f"budget must be a non-negative number of tokens, got {budget!r}")
        if not isinstance(eth_wei, int) or eth_wei < 0:
            raise ConfigError("eth_wei must be a non-negative int")
        payer = cls(Devnet.shared, wallet=Wallet.generate(), platform=platform)
        payer._funding = (tokens, eth_wei)
        return payer

    # --- properties -----------------------------------------------------------------

    @property
    def address(self) -> str:
        """The requestor's checksummed address (known before ``start``)."""
        return self._wallet.address

    @property
    def wallet(self) -> Wallet:
        """The requestor's wallet (it signs market messages too; it never shows its key)."""
        return self._wallet

    @property
    def w3(self) -> Web3:
        """The ``web3.Web3`` this payer uses; starts the chain synchronously if needed.

        On the embedded devnet, hold ``Devnet.shared().lock`` while calling it from a
        thread other than the one driving the payer.
        """
        self._start_sync()
        assert self._w3 is not None
        return self._w3

    @property
    def token(self) -> Contract:
        """The token's web3 contract object; starts the chain synchronously if needed."""
        self._start_sync()
        assert self._token is not None
        return self._token

    @property
    def token_address(self) -> str:
        """The token contract's checksummed address; starts the chain if needed."""
        self._start_sync()
        assert self._token_address is not None
        return self._token_address

    @property
    def chain_id(self) -> int:
        """The chain id; starts the chain if needed."""
        self._start_sync()
        assert self._chain_id is not None
        return self._chain_id

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the chain and, for an embedded payer, fund the wallet.

        Raises
        ------
        PaymentError
            If the chain could not be reached or the wallet could not be funded.
        """
        await self._ensure_started()

    async def close(self) -> None:
        """Stop accepting payments.  Idempotent; the shared devnet stays up."""
        if not self._closed:
            self._closed = True
            logger.debug("payer %s closed", self.address)

    async def _ensure_started(self) -> None:
        if self._closed:
            raise PaymentError(f"{self!r} is closed; create a new payer to pay again")
        if self._started:
            return
        async with self._locks().start:
            if not self._started:
                await asyncio.to_thread(self._start_sync)

    def _start_sync(self) -> None:
        if self._started:
            return
        # A threading lock, not only the asyncio one, because the ``w3``/``token``
        # properties start the chain synchronously from any thread.
        with self._start_lock:
            if self._started:
                return
            try:
                self._connect()
            except GolemDaskError:
                raise
            except Exception as e:
                raise PaymentError(
                    f"could not start the payment chain for {self.platform}: "
                    f"{type(e).__name__}: {e}. Check the chain connection (or, for the "
                    "embedded devnet, that web3 and eth-tester[py-evm] are installed)"
                ) from e
            self._started = True

    def _connect(self) -> None:
        from web3 import Web3

        source: Any = self._chain_source
        if callable(source) and not isinstance(source, Devnet | Web3):
            source = source()
        batch_address = self._batch_address_arg
        if isinstance(source, Devnet):
            devnet = source
            w3 = devnet.w3
            self._chain_lock = devnet.lock
            token_address = self._token_address_arg or devnet.token_address
            batch_address = batch_address or getattr(devnet, "batch_address", None)
            abi = devnet.token.abi
        elif isinstance(source, Web3):
            devnet = None
            w3 = source
            if self._token_address_arg is None:
                raise ConfigError("token_address is required when paying on a Web3 chain")
            token_address = self._token_address_arg
            from golem_dask.payment.contracts import load_artifact

            # Any ERC-20 works: our token's ABI is the ERC-20 ABI plus `mint`.
            abi = load_artifact("GolemDaskToken")["abi"]
        else:
            raise ConfigError(
                f"chain must be a web3.Web3, a Devnet or a callable returning one, "
                f"got {type(source).__name__}"
            )
        if not Web3.is_address(token_address):
            raise ConfigError(f"token_address {token_address!r} is not an Ethereum address")
        token_address = Web3.to_checksum_address(token_address)

        with self._chain_lock:
            chain_id = int(w3.eth.chain_id)
            if self._expected_chain_id is not None and chain_id != self._expected_chain_id:
                raise ConfigError(f"the node at the RPC URL is chain {chain_id}, not golem.payment.chain-id="
                                  f"{self._expected_chain_id}; check which network you point at")
            if not w3.eth.get_code(token_address):
                raise PaymentError(
                    f"no contract at token address {token_address} on chain {chain_id}; "
                    "check token_address and the chain the Web3 is connected to"
                )
            token = w3.eth.contract(address=token_address, abi=abi)
            if batch_address:
                from golem_dask.payment.contracts import load_artifact

                batch_address = Web3.to_checksum_address(batch_address)
                if not w3.eth.get_code(batch_address):
                    raise PaymentError(f"no contract at batch address {batch_address} on chain {chain_id}; "
                                       "check golem.payment.batch-address (or leave it empty to pay one by one)")
                self._batch = w3.eth.contract(address=batch_address, abi=load_artifact("GolemDaskBatch")["abi"])

        if self._funding is not None:
            if devnet is None:
                raise ConfigError("only a payer on a Devnet can fund its own wallet")
            tokens, eth_wei = self._funding
            logger.info(
                "funding requestor %s on the embedded devnet: %s tokens, %d wei for gas",
                self.address,
                tokens,
                eth_wei,
            )
            devnet.fund(self.address, tokens, eth_wei)
            self._funding = None

        self._w3, self._token = w3, token
        self._token_address, self._chain_id = token_address, chain_id
        logger.debug(
            "payer %s started on chain %d, token %s", self.address, chain_id, token_address
        )

    def _locks(self) -> _LoopLocks:
        loop = asyncio.get_running_loop()
        locks = self._loop_locks.get(loop)
        if locks is None:
            locks = self._loop_locks[loop] = _LoopLocks(asyncio.Lock(), asyncio.Lock())
        return locks

    # --- paying ---------------------------------------------------------------------

    async def pay(self, payee: str, amount: Decimal, *, reference: str) -> Transfer:
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
        payee = self._checksum(payee, "payee")
        wei = self._amount_wei(amount)
        # The debt is written first, even if the chain is unreachable right now.
        debt = await asyncio.to_thread(
            self.ledger.add_debt, reference, reference, self.address, payee, wei, self.platform
        )
        if debt.payee != payee or debt.amount_wei != wei:
            raise PaymentError(f"invoice {reference} is already owed with other terms ({debt.payee}, {debt.amount})")
        self._checkpoint("debt")
        await self._ensure_started()
        await self.settle()
        debt = await asyncio.to_thread(self.ledger.debt, debt.id)
        if debt.status != PAID or debt.payment_id is None:
            cause = self._errors.pop(debt.id, None)
            raise PaymentError(
                f"payment of {amount} tokens to {payee} (reference {reference}) is still {debt.status}"
                + (f": {cause}" if cause else "")
                + "; the debt stays in the ledger: 'golem-dask pay' settles it once this is fixed"
            )
        record = await asyncio.to_thread(self.ledger.payment, debt.payment_id)
        assert record.confirmed_hash is not None and record.block_number is not None
        return Transfer(payee=payee, amount_wei=wei, tx_hash=record.confirmed_hash, block_number=record.block_number)

    async def settle(self) -> list[PaymentRecord]:
        """Reconcile unfinished payments with the chain, then pay every owed debt.

        Returns the payments confirmed by this call.  Safe to call concurrently (one
        runs at a time) and after a crash (reconciling comes first).
        """
        await self._ensure_started()
        async with self._locks().pay:
            if self._batch_window_s:
                await asyncio.sleep(self._batch_window_s)  # let concurrent debts join
            return await asyncio.to_thread(self._settle_sync)

    def owed(self) -> list[Debt]:
        """Debts of this payer not yet paid."""
        return [d for d in self.ledger.debts() if d.payer == self.address and d.status != PAID]

    def _checkpoint(self, step: str) -> None:
        if self._on_step is not None:
            self._on_step(step)

    def _settle_sync(self) -> list[PaymentRecord]:
        with self._send_lock:
            done = self._reconcile_sync()
            owed = self.ledger.owed(self.address)
            if not owed:
                return done
            if self._batch is not None and len(owed) > 1:
                groups = [owed[i:i + _BATCH_MAX] for i in range(0, len(owed), _BATCH_MAX)]
            else:
                groups = [[debt] for debt in owed]
            for group in groups:
                # One payment failing (say, a balance too low for it) must not stop the
                # others; its debts stay owed and the reason reaches their pay() callers.
                try:
                    done.append(self._pay_group(group))
                except PaymentError as e:
                    for debt in group:
                        self._errors[debt.id] = str(e)
                    logger.warning("%s", e)
            return done

    def _pay_group(self, group: list[Debt]) -> PaymentRecord:
        if len(group) == 1:
            (d,) = group
            call = self._token.functions.transfer(d.payee, d.amount_wei)  # type: ignore[union-attr]
            what = f"payment of {d.amount} tokens to {d.payee} (reference {d.invoice_id})"
            return self._submit("transfer", group, call, what)
        assert self._batch is not None
        self._ensure_allowance(sum(d.amount_wei for d in group))
        call = self._batch.functions.batchTransferFrom(self._token_address, [pack_payment(d) for d in group])
        total = from_wei(sum(d.amount_wei for d in group))
        what = f"batch payment of {total} tokens to {len(group)} payees (references {', '.join(d.invoice_id for d in group)})"
        return self._submit("batch", group, call, what)

    def _ensure_allowance(self, wei: int) -> None:
        assert self._token is not None and self._batch is not None
        with self._chain_lock:
            allowance = int(self._token.functions.allowance(self.address, self._batch.address).call())
        if allowance < wei:
            # Once, for good: the batch contract holds nothing and can only move tokens
            # from the account that calls it.
            self._submit("approve", [], self._token.functions.approve(self._batch.address, 2**256 - 1),
                         "approving the batch contract")

    def _fees(self, bump: int = 0) -> dict[str, int]:
        """EIP-1559 fees: twice the base fee plus the tip, never above the cap."""
        assert self._w3 is not None
        with self._chain_lock:
            base = self._w3.eth.get_block("latest").get("baseFeePerGas")
        if base is None:
            with self._chain_lock:
                return {"gasPrice": int(self._w3.eth.gas_price * (125 ** bump) // (100 ** bump))}
        tip = self._priority_fee_wei * (125 ** bump) // (100 ** bump)
        max_fee = (2 * int(base) + self._priority_fee_wei) * (125 ** bump) // (100 ** bump)
        if self._max_fee_wei is not None:
            if int(base) + tip > self._max_fee_wei:
                raise PaymentError(
                    f"the chain's base fee ({int(base)} wei) plus tip exceeds the fee cap "
                    f"({self._max_fee_wei} wei, golem.payment.max-fee-gwei); raise the cap or wait"
                )
            max_fee = min(max_fee, self._max_fee_wei)
            tip = min(tip, max_fee)
        return {"maxFeePerGas": max_fee, "maxPriorityFeePerGas": tip}

    def _sign(self, call: Any, nonce: int, fees: dict[str, int], gas: int | None = None) -> tuple[bytes, str, int]:
        from eth_utils import keccak

        params: dict[str, Any] = {"from": self.address, "nonce": nonce, "chainId": self._chain_id, **fees}
        if gas is not None:
            params["gas"] = gas
        with self._chain_lock:
            # build_transaction estimates gas by executing the call: one that would
            # revert fails here, before anything is signed or recorded.
            tx = call.build_transaction(cast("TxParams", params))
        raw = self._wallet.sign_transaction(dict(tx))
        return raw, "0x" + keccak(raw).hex(), int(tx["gas"])

    def _next_nonce_sync(self) -> int:
        assert self._w3 is not None
        with self._chain_lock:
            pending = int(self._w3.eth.get_transaction_count(cast("ChecksumAddress", self.address), "pending"))
        recorded = self.ledger.max_nonce(self.address)
        return max(pending, -1 if recorded is None else recorded + 1)

    def _submit(self, kind: str, debts: list[Debt], call: Any, what: str) -> PaymentRecord:
        try:
            nonce = self._next_nonce_sync()
            fees = self._fees()
            raw, tx_hash, gas = self._sign(call, nonce, fees)
        except GolemDaskError:
            raise
        except Exception as e:
            raise self._error(what, e) from e
        payment_id = self.ledger.record_signed(
            self.address, nonce, kind, [d.id for d in debts], tx_hash, raw, fees.get("maxFeePerGas"))
        self._checkpoint("signed")
        self._broadcast(raw, what)
        self.ledger.mark_sent(payment_id)
        self._checkpoint("sent")
        receipt = self._await_receipt(payment_id, call, nonce, fees, gas, what)
        self._checkpoint("receipt")
        return self._finish(payment_id, receipt, what)

    def _broadcast(self, raw: bytes, what: str) -> None:
        assert self._w3 is not None
        try:
            with self._chain_lock:
                self._w3.eth.send_raw_transaction(raw)
        except Exception as e:
            text = str(e).lower()
            # Re-sending what the node already has (after a crash) is not an error.
            if "already known" in text or "already imported" in text or "known transaction" in text:
                return
            raise self._error(what, e) from e

    def _receipt(self, tx_hashes: Sequence[str]) -> Any:
        from web3.exceptions import TransactionNotFound

        assert self._w3 is not None
        for tx_hash in tx_hashes:
            try:
                with self._chain_lock:
                    return self._w3.eth.get_transaction_receipt(cast("HexBytes", tx_hash))
            except TransactionNotFound:
                continue
        return None

    def _await_receipt(
        self, payment_id: str, call: Any, nonce: int, fees: dict[str, int], gas: int, what: str
    ) -> Any:
        """Poll for a receipt of any of the payment's transactions; replace it when stuck."""
        started = time.monotonic()
        replaced_at = started
        bump = 0
        hashes = list(self.ledger.payment(payment_id).tx_hashes)
        while True:
            try:
                receipt = self._receipt(hashes)
            except Exception as e:
                raise self._error(what, e) from e
            if receipt is not None:
                return receipt
            now = time.monotonic()
            if now - started >= self._receipt_timeout:
                raise PaymentError(
                    f"{what}: no receipt for {', '.join(hashes)} after {self._receipt_timeout:g}s; the ledger "
                    "keeps it as sent, and the next settle (or 'golem-dask pay') checks the chain first"
                )
            if call is not None and now - replaced_at >= self._replace_after_s:
                bump += 1
                try:
                    new_fees = self._fees(bump)
                    raw, tx_hash, _ = self._sign(call, nonce, new_fees, gas)
                except PaymentError as e:  # at the fee cap: keep waiting for the old one
                    logger.warning("%s: cannot replace the stuck transaction: %s", what, e)
                    call = None
                else:
                    self.ledger.add_replacement(payment_id, tx_hash, raw, new_fees.get("maxFeePerGas"))
                    hashes.append(tx_hash)
                    logger.warning("%s: transaction stuck for %.0fs; replaced it with %s (same nonce %d, higher fee)",
                                   what, now - replaced_at, tx_hash, nonce)
                    self._broadcast(raw, what)
                replaced_at = now
            time.sleep(self._poll_interval)

    def _finish(self, payment_id: str, receipt: Any, what: str) -> PaymentRecord:
        record = self.ledger.payment(payment_id)
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        if receipt["status"] != 1:
            self.ledger.mark_failed(payment_id, f"transaction {tx_hash} reverted")
            raise PaymentError(
                f"{what} reverted on chain in transaction {tx_hash}; check the requestor's token balance "
                f"with payer.balance({self.address!r}) and top it up; the debts are owed again"
            )
        debts = [self.ledger.debt(d) for d in record.debt_ids]
        missing = self._unmatched_transfers(receipt, [(d.payee, d.amount_wei) for d in debts])
        if missing:
            self.ledger.mark_failed(payment_id, f"transaction {tx_hash} lacks Transfer events for {missing}")
            raise PaymentError(
                f"{what}: transaction {tx_hash} succeeded but its receipt lacks Transfer events for {missing}; "
                f"{self._token_address} may not be a standard ERC-20 token"
            )
        self.ledger.mark_confirmed(payment_id, tx_hash, int(receipt["blockNumber"]))
        for d in debts:
            logger.info("paid %s tokens to %s (reference %s) in tx %s, block %d, gas %d",
                        d.amount, d.payee, d.invoice_id, tx_hash, receipt["blockNumber"], receipt["gasUsed"])
        return self.ledger.payment(payment_id)

    def _reconcile_sync(self) -> list[PaymentRecord]:
        """Settle what a crash left signed or sent, by hash and nonce, before anything new."""
        assert self._w3 is not None
        done = []
        for record in self.ledger.unfinished(self.address):
            what = f"unfinished {record.kind} (nonce {record.nonce})"
            receipt = self._receipt(record.tx_hashes)
            if receipt is None:
                with self._chain_lock:
                    used = int(self._w3.eth.get_transaction_count(cast("ChecksumAddress", self.address), "latest"))
                if used > record.nonce:
                    # None of our hashes is mined, yet the nonce is spent: it went to
                    # another transaction.  The debts are owed again, under a new nonce.
                    self.ledger.mark_failed(record.id, f"nonce {record.nonce} was used by another transaction")
                    continue
                # Never mined: send the very same signed bytes again (same nonce).
                logger.warning("re-sending %s as %s", what, record.tx_hashes[-1])
                self._broadcast(self.ledger.raw_transaction(record.tx_hashes[-1]), what)
                self.ledger.mark_sent(record.id)
                receipt = self._await_receipt(record.id, None, record.nonce, {}, 0, what)
            try:
                done.append(self._finish(record.id, receipt, what))
            except PaymentError as e:
                logger.warning("%s", e)
        return done

    def _unmatched_transfers(self, receipt: Any, expected: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The (payee, wei) pairs with no matching token Transfer event in ``receipt``."""
        from web3.logs import DISCARD

        assert self._token is not None
        with self._chain_lock:
            events = self._token.events.Transfer().process_receipt(receipt, errors=DISCARD)
        seen = [
            (e["args"]["receiver"], int(e["args"]["value"]))
            for e in events
            # Any contract can emit an event with this signature; only the token's count.
            if e["address"] == self._token_address and e["args"]["sender"] == self.address
        ]
        missing = []
        for pair in expected:
            if pair in seen:
                seen.remove(pair)  # two equal debts need two events
            else:
                missing.append(pair)
        return missing

    def _error(self, what: str, e: Exception) -> PaymentError:
        # The key never reaches web3 (only the signed transaction does), so web3's own
        # messages are safe to include.
        detail = f"{type(e).__name__}: {e}"
        lowered = str(e).lower()
        if "insufficient balance" in lowered:
            hint = (
                f"the requestor {self.address} holds too few tokens; check "
                "payer.balance(payer.address) and top up the wallet or lower the budget"
            )
        elif "insufficient funds" in lowered or ("gas" in lowered and "fund" in lowered):
            hint = (
                f"the requestor {self.address} cannot pay for gas; send it ETH "
                "(check payer.eth_balance(payer.address))"
            )
        elif "nonce" in lowered:
            hint = (
                "another process may be sending from the same wallet; "
                "use one payer per wallet and retry"
            )
        else:
            hint = "check the chain connection and retry"
        return PaymentError(f"{what} failed ({detail}); {hint}")

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
        address = self._checksum(address, "address")
        await self._ensure_started()
        token = self._token
        assert token is not None
        wei = await asyncio.to_thread(
            self._call,
            f"reading the token balance of {address}",
            lambda: token.functions.balanceOf(address).call(),
        )
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
        address = self._checksum(address, "address")
        await self._ensure_started()
        w3 = self._w3
        assert w3 is not None
        wei = await asyncio.to_thread(
            self._call,
            f"reading the ETH balance of {address}",
            lambda: w3.eth.get_balance(address),
        )
        return int(wei)

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            with self._chain_lock:
                return fn()
        except Exception as e:
            raise self._error(what, e) from e

    # --- validation -----------------------------------------------------------------

    @staticmethod
    def _checksum(address: str, role: str) -> ChecksumAddress:
        from eth_utils import is_address, to_checksum_address

        if not isinstance(address, str) or not is_address(address):
            raise PaymentError(
                f"{role} {address!r} is not a valid Ethereum address "
                "(0x followed by 40 hex digits, checksummed or all lower case)"
            )
        return to_checksum_address(address)

    @staticmethod
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(platform={self.platform!r}, address={self.address!r})"
