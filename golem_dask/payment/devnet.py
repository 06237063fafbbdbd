"""The embedded Ethereum devnet: a real EVM running inside the requestor process.

:class:`Devnet` wraps ``web3.Web3(web3.EthereumTesterProvider())`` (py-evm under
eth-tester), deploys the shipped ``GolemDaskToken`` ERC-20 on it, and acts as a faucet
that hands out ETH for gas and freshly minted test tokens.  Payments on it are real EVM
transactions with real receipts and event logs, so the same payer code that talks to a
public chain is exercised end to end without a network.

Creating a chain takes a noticeable fraction of a second (plus web3's import time), so
one chain per process is shared through :meth:`Devnet.shared`.  Users of the shared
chain never share accounts: every payer generates a fresh wallet and every provider has
its own address, so balances cannot mix.

eth-tester is not thread safe, and payers call it from worker threads
(``asyncio.to_thread``); every web3 call on a devnet must therefore hold
:attr:`Devnet.lock`.  The methods of this class take it themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, cast

from golem_dask.errors import PaymentError
from golem_dask.payment.base import from_wei, to_wei
from golem_dask.payment.contracts import load_artifact

if TYPE_CHECKING:
    from web3 import Web3
    from eth_typing import ChecksumAddress
    from web3.contract import Contract
    from web3.types import TxParams

__all__ = ["Devnet", "TOKEN_CONTRACT"]

logger = logging.getLogger(__name__)

#: Name of the shipped artefact deployed as the devnet's payment token.
TOKEN_CONTRACT = "GolemDaskToken"

#: Seconds to wait for a receipt.  eth-tester mines each transaction as it arrives, so
#: this only matters if something is badly wrong.
_RECEIPT_TIMEOUT = 30.0


class Devnet:
    """An in-process Ethereum chain with the golem-dask test token deployed.

    Prefer :meth:`shared` over the constructor: one chain per process is enough, and
    each chain costs time to create.

    Attributes
    ----------
    w3:
        The ``web3.Web3`` connected to the chain.  Hold :attr:`lock` while using it.
    token:
        The web3 contract object of the deployed ``GolemDaskToken``.
    token_address:
        The checksummed address of the token contract.
    chain_id:
        The chain id (eth-tester's default).
    faucet:
        The pre-funded eth-tester account that deployed the token and is its minter.
    lock:
        A re-entrant lock serialising every call on :attr:`w3`.

    Examples
    --------
    >>> from decimal import Decimal
    >>> from golem_dask.payment.wallet import Wallet
    >>> devnet = Devnet.shared()
    >>> wallet = Wallet.generate()
    >>> devnet.fund(wallet.address, Decimal("2.5"))
    >>> devnet.token_balance(wallet.address)
    Decimal('2.5')
    >>> devnet.eth_balance(wallet.address)
    1000000000000000000
    """

    _shared: ClassVar[Devnet | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        # web3 costs ~1.5 s to import; only pay that when a chain is really wanted.
        from web3 import EthereumTesterProvider, Web3

        started = time.perf_counter()
        self.lock = threading.RLock()
        self.w3: Web3 = Web3(EthereumTesterProvider())
        self.chain_id: int = self.w3.eth.chain_id
        # eth-tester's first account is unlocked and holds 1,000,000 ETH; it deploys
        # the token and so becomes its only minter.
        self.faucet: str = self.w3.eth.accounts[0]

        artifact = load_artifact(TOKEN_CONTRACT)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx_hash = factory.constructor().transact({"from": self.faucet})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=_RECEIPT_TIMEOUT)
        if receipt["status"] != 1 or not receipt["contractAddress"]:
            raise PaymentError(
                f"deploying {TOKEN_CONTRACT} on the embedded devnet failed; the shipped "
                "artefact may be corrupt: reinstall golem-dask"
            )
        self.token_address: str = receipt["contractAddress"]
        self.token: Contract = self.w3.eth.contract(
            address=self.token_address, abi=artifact["abi"]
        )
        self.startup_seconds = time.perf_counter() - started
        logger.info(
            "embedded devnet ready in %.2f s: chain id %d, %s at %s",
            self.startup_seconds,
            self.chain_id,
            TOKEN_CONTRACT,
            self.token_address,
        )

    @classmethod
    def shared(cls) -> Devnet:
        """The process-wide devnet, created on first use.

        Thread safe: concurrent first callers wait for one creation.

        Examples
        --------
        >>> Devnet.shared() is Devnet.shared()
        True
        """
        devnet = cls._shared
        if devnet is not None:  # fast path without the lock
            return devnet
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def fund(self, address: str, tokens: Decimal, eth_wei: int = 10**18) -> None:
        """Send ETH for gas and mint tokens to ``address``; return after the receipts.

        Parameters
        ----------
        address:
            The account to fund.
        tokens:
            Token units to mint to it (``Decimal``; at most 18 decimals).
        eth_wei:
            Wei of ETH to send from the faucet, for gas.  The default, 1 ETH, pays for
            about 20,000 token transfers at the devnet's 1 gwei base fee.

        Raises
        ------
        PaymentError
            If ``address`` or an amount is invalid, or a funding transaction failed.

        Examples
        --------
        >>> from decimal import Decimal
        >>> from golem_dask.payment.wallet import Wallet
        >>> address = Wallet.generate().address
        >>> Devnet.shared().fund(address, Decimal(7), eth_wei=0)
        >>> Devnet.shared().token_balance(address)
        Decimal('7')
        """
        checksummed = self._checksum(address)
        try:
            token_wei = to_wei(Decimal(tokens))
        except (ValueError, ArithmeticError) as e:
            raise PaymentError(f"cannot fund {tokens!r} tokens: {e}") from e
        if token_wei < 0 or eth_wei < 0:
            raise PaymentError("funding amounts must not be negative")
        try:
            with self.lock:
                hashes = []
                if eth_wei:
                    hashes.append(
                        self.w3.eth.send_transaction(
                            cast(
                                "TxParams",
                                {"from": self.faucet, "to": checksummed, "value": eth_wei},
                            )
                        )
                    )
                if token_wei:
                    hashes.append(
                        self.token.functions.mint(checksummed, token_wei).transact(
                            {"from": self.faucet}
                        )
                    )
                receipts = [
                    self.w3.eth.wait_for_transaction_receipt(h, timeout=_RECEIPT_TIMEOUT)
                    for h in hashes
                ]
        except Exception as e:
            raise PaymentError(
                f"funding {checksummed} on the embedded devnet failed: {e}"
            ) from e
        if any(r["status"] != 1 for r in receipts):
            raise PaymentError(f"a funding transaction to {checksummed} reverted")
        logger.debug(
            "devnet faucet funded %s with %s tokens and %d wei",
            checksummed,
            tokens,
            eth_wei,
        )

    def token_balance(self, address: str) -> Decimal:
        """Token balance of ``address`` in token units."""
        checksummed = self._checksum(address)
        with self.lock:
            return from_wei(self.token.functions.balanceOf(checksummed).call())

    def eth_balance(self, address: str) -> int:
        """ETH balance of ``address`` in wei."""
        checksummed = self._checksum(address)
        with self.lock:
            return int(self.w3.eth.get_balance(checksummed))

    def _checksum(self, address: str) -> ChecksumAddress:
        from web3 import Web3

        if not isinstance(address, str) or not Web3.is_address(address):
            raise PaymentError(f"{address!r} is not a valid Ethereum address")
        return Web3.to_checksum_address(address)

    def __repr__(self) -> str:
        return f"Devnet(chain_id={self.chain_id}, token_address={self.token_address!r})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Devnet is an in-process chain and cannot be pickled; "
            "pass addresses, not the Devnet, to remote code"
        )
