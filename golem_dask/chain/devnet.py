"""The embedded Ethereum devnet: a real EVM running inside the requestor process.

:class:`Devnet` wraps ``web3.Web3(web3.EthereumTesterProvider())`` (py-evm under
eth-tester), deploys the shipped contracts on it (the ``GolemDaskToken`` ERC-20 and the
``GolemDaskBatch`` payer), and acts as a faucet that hands out ETH for gas and freshly minted test tokens.  Payments on it are real EVM
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

from golem_dask.chain.deploy import TOKEN_CONTRACT, deploy_contracts, fund, token_contract
from golem_dask.chain.units import address as checked_address
from golem_dask.chain.units import from_wei

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress
    from web3 import Web3
    from web3.contract import Contract

__all__ = ["Devnet"]

logger = logging.getLogger(__name__)


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
    batch_address:
        The checksummed address of the batch-payment contract.
    chain_id:
        The chain id (eth-tester's default).
    faucet:
        The pre-funded eth-tester account that deployed the token and is its minter.
    lock:
        A re-entrant lock serialising every call on :attr:`w3`.

    Examples
    --------
    >>> from decimal import Decimal
    >>> from golem_dask.protocol.identity import Wallet
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

        addresses = deploy_contracts(self.w3, self.faucet)
        self.token_address: str = str(addresses["token"])
        self.batch_address: str | None = addresses["batch"]
        self.token: Contract = token_contract(self.w3, self.token_address)
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
        >>> from golem_dask.protocol.identity import Wallet
        >>> address = Wallet.generate().address
        >>> Devnet.shared().fund(address, Decimal(7), eth_wei=0)
        >>> Devnet.shared().token_balance(address)
        Decimal('7')
        """
        with self.lock:
            fund(self.w3, self.token, self.faucet, address, tokens, eth_wei)
        logger.debug("devnet faucet funded %s with %s tokens and %d wei", address, tokens, eth_wei)

    def token_balance(self, address: str) -> Decimal:
        """Token balance of ``address`` in token units."""
        checksummed = checked_address(address)
        with self.lock:
            return from_wei(self.token.functions.balanceOf(checksummed).call())

    def eth_balance(self, address: str) -> int:
        """ETH balance of ``address`` in wei."""
        checksummed = checked_address(address)
        with self.lock:
            return int(self.w3.eth.get_balance(cast("ChecksumAddress", checksummed)))

    def __repr__(self) -> str:
        return f"Devnet(chain_id={self.chain_id}, token_address={self.token_address!r})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Devnet is an in-process chain and cannot be pickled; "
            "pass addresses, not the Devnet, to remote code"
        )
