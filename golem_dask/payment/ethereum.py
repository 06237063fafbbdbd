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
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar, Union, cast

from golem_dask.errors import ConfigError, GolemDaskError, PaymentError
from golem_dask.payment.base import Payer, Transfer, from_wei, to_wei
from golem_dask.payment.devnet import Devnet
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
        self._next_nonce: int | None = None
        self._started = False
        self._closed = False
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopLocks]
        self._loop_locks = weakref.WeakKeyDictionary()

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
        if isinstance(source, Devnet):
            devnet = source
            w3 = devnet.w3
            self._chain_lock = devnet.lock
            token_address = self._token_address_arg or devnet.token_address
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
            if not w3.eth.get_code(token_address):
                raise PaymentError(
                    f"no contract at token address {token_address} on chain {chain_id}; "
                    "check token_address and the chain the Web3 is connected to"
                )
            token = w3.eth.contract(address=token_address, abi=abi)

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
        """Transfer ``amount`` tokens to ``payee`` and wait for the receipt.

        The transfer counts as made only if the transaction succeeded *and* its
        receipt holds the token's ``Transfer(requestor, payee, amount)`` event.
        Concurrent calls are safe: nonces are assigned one at a time.

        Parameters
        ----------
        payee:
            The provider's address.
        amount:
            Token units (``Decimal`` or ``int``; positive, at most 18 decimals).
        reference:
            Invoice id; it appears in log lines so a payment can be traced.

        Returns
        -------
        Transfer
            Payee (checksummed), amount in wei, ``0x``-prefixed transaction hash and
            block number.

        Raises
        ------
        PaymentError
            If the amount or payee is invalid, the requestor cannot cover the amount or
            the gas, or the chain failed; the message says what to do.

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
        await self._ensure_started()
        what = f"payment of {amount} tokens to {payee} (reference {reference})"
        async with self._locks().pay:
            tx_hash = await asyncio.to_thread(self._send_transfer, payee, wei, what)
        # The receipt is awaited outside the pay lock: the nonce is already taken, so
        # on a slow chain several payments can be in flight at once.
        receipt = await asyncio.to_thread(self._wait_for_receipt, tx_hash, what)
        tx_hex = "0x" + bytes(tx_hash).hex()
        if receipt["status"] != 1:
            self._next_nonce = None
            raise PaymentError(
                f"{what} reverted on chain in transaction {tx_hex}; check the requestor's "
                f"token balance with payer.balance({self.address!r}) and top it up"
            )
        if not self._has_transfer_event(receipt, payee, wei):
            raise PaymentError(
                f"{what}: transaction {tx_hex} succeeded but its receipt has no matching "
                f"Transfer event; {self._token_address} may not be a standard ERC-20 token"
            )
        transfer = Transfer(
            payee=payee,
            amount_wei=wei,
            tx_hash=tx_hex,
            block_number=int(receipt["blockNumber"]),
        )
        logger.info(
            "paid %s tokens to %s (reference %s) in tx %s, block %d, gas %d",
            amount,
            payee,
            reference,
            tx_hex,
            transfer.block_number,
            receipt["gasUsed"],
        )
        return transfer

    def _send_transfer(self, payee: str, wei: int, what: str) -> bytes:
        assert self._token is not None and self._w3 is not None
        # _send_lock spans nonce choice through broadcast, so two pays (even from two
        # event loops) never sign the same nonce.
        with self._send_lock:
            try:
                with self._chain_lock:
                    sender = cast("ChecksumAddress", self.address)
                    pending = int(self._w3.eth.get_transaction_count(sender, "pending"))
                    nonce = max(pending, self._next_nonce or 0)
                    # build_transaction estimates gas, which executes the transfer: a
                    # transfer that would revert fails here, before anything is signed.
                    params = {"from": self.address, "nonce": nonce, "chainId": self._chain_id}
                    tx = self._token.functions.transfer(payee, wei).build_transaction(
                        cast("TxParams", params)
                    )
                raw = self._wallet.sign_transaction(dict(tx))
                with self._chain_lock:
                    tx_hash = self._w3.eth.send_raw_transaction(raw)
            except Exception as e:
                # The chain's view of the nonce is authoritative after a failure.
                self._next_nonce = None
                raise self._error(what, e) from e
            self._next_nonce = nonce + 1
            logger.debug("sent %s as tx 0x%s (nonce %d)", what, bytes(tx_hash).hex(), nonce)
            return bytes(tx_hash)

    def _wait_for_receipt(self, tx_hash: bytes, what: str) -> Any:
        from web3.exceptions import TransactionNotFound

        # Poll ourselves instead of w3.eth.wait_for_transaction_receipt so the chain
        # lock is released between polls and other payers can use the chain.
        deadline = time.monotonic() + self._receipt_timeout
        while True:
            try:
                with self._chain_lock:
                    return self._w3.eth.get_transaction_receipt(  # type: ignore[union-attr]
                        cast("HexBytes", tx_hash)
                    )
            except TransactionNotFound:
                pass
            except Exception as e:
                raise self._error(what, e) from e
            if time.monotonic() >= deadline:
                raise PaymentError(
                    f"{what}: no receipt for tx 0x{tx_hash.hex()} after "
                    f"{self._receipt_timeout:g} s; it may still be mined — check the hash "
                    "on chain before paying again, or raise receipt_timeout"
                )
            time.sleep(self._poll_interval)

    def _has_transfer_event(self, receipt: Any, payee: str, wei: int) -> bool:
        from web3.logs import DISCARD

        assert self._token is not None
        with self._chain_lock:
            events = self._token.events.Transfer().process_receipt(receipt, errors=DISCARD)
        for event in events:
            # Any contract can emit an event with this signature; only the token's count.
            if event["address"] != self._token_address:
                continue
            args = event["args"]
            if (
                args["sender"] == self.address
                and args["receiver"] == payee
                and int(args["value"]) == wei
            ):
                return True
        return False

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
