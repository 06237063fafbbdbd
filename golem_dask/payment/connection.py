"""The payer's connection to a chain: node, token, optional batch contract, one lock.

:func:`connect` checks what a payer is pointed at (the chain id it expects, a contract
at the token's and the batch contract's address) before anything is signed, and
:meth:`Connection.call` runs one chain read under the connection's lock with web3's
errors translated into :class:`~golem_dask.errors.PaymentError` with a hint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from golem_dask.chain.contracts import load_artifact
from golem_dask.chain.deploy import BATCH_CONTRACT, token_contract
from golem_dask.chain.devnet import Devnet
from golem_dask.errors import ConfigError, PaymentError
from golem_dask.protocol.identity import checksum_address

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress
    from web3 import Web3
    from web3.contract import Contract

_T = TypeVar("_T")


def chain_error(payer: str, what: str, e: Exception) -> PaymentError:
    """``what`` failed because of ``e``: a PaymentError that says what to do.

    The key never reaches web3 (only signed transactions do), so web3's own messages
    are safe to include.
    """
    detail = f"{type(e).__name__}: {e}"
    lowered = str(e).lower()
    if "insufficient balance" in lowered:
        hint = (f"the requestor {payer} holds too few tokens; check payer.balance(payer.address) "
                "and top up the wallet or lower the budget")
    elif "insufficient funds" in lowered or ("gas" in lowered and "fund" in lowered):
        hint = f"the requestor {payer} cannot pay for gas; send it ETH (check payer.eth_balance(payer.address))"
    elif "nonce" in lowered:
        hint = "another process may be sending from the same wallet; use one payer per wallet and retry"
    else:
        hint = "check the chain connection and retry"
    return PaymentError(f"{what} failed ({detail}); {hint}")


@dataclass(slots=True)
class Connection:
    """A checked connection: hold :attr:`lock` for every call on :attr:`w3`.

    On the embedded devnet the lock is the devnet's own (eth-tester is not thread
    safe, and every payer in the process shares the chain).
    """

    w3: Web3
    chain_id: int
    token: Contract
    batch: Contract | None
    lock: Any
    devnet: Devnet | None = None

    @property
    def token_address(self) -> str:
        return str(self.token.address)

    def call(self, payer: str, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()`` under the lock; its failure raised as PaymentError about ``what``."""
        try:
            with self.lock:
                return fn()
        except Exception as e:
            raise chain_error(payer, what, e) from e


def connect(source: Any, token_address: str | None, batch_address: str | None,
            expected_chain_id: int | None) -> Connection:
    """Connect to ``source`` (a ``Web3``, a :class:`Devnet`, or a callable giving one).

    A devnet supplies its own token and batch contract unless others are named.

    Raises
    ------
    ConfigError
        If the source is of the wrong kind, an address is malformed, or the node is
        another chain than ``expected_chain_id``.
    PaymentError
        If no contract lives at the token's or the batch contract's address.
    """
    from web3 import Web3

    if callable(source) and not isinstance(source, Devnet | Web3):
        source = source()
    devnet = source if isinstance(source, Devnet) else None
    if devnet is not None:
        w3, lock = devnet.w3, devnet.lock
        token_address = token_address or devnet.token_address
        batch_address = batch_address or devnet.batch_address
    elif isinstance(source, Web3):
        w3, lock = source, threading.RLock()
        if token_address is None:
            raise ConfigError("token_address is required when paying on a Web3 chain")
    else:
        raise ConfigError(f"chain must be a web3.Web3, a Devnet or a callable returning one, "
                          f"got {type(source).__name__}")
    try:
        token = cast("ChecksumAddress", checksum_address(token_address))
        batch_at = cast("ChecksumAddress", checksum_address(batch_address)) if batch_address else None
    except ValueError as e:
        raise ConfigError(f"token or batch address: {e}") from None
    with lock:
        chain_id = int(w3.eth.chain_id)
        if expected_chain_id is not None and chain_id != expected_chain_id:
            raise ConfigError(f"the node at the RPC URL is chain {chain_id}, not golem.payment.chain-id="
                              f"{expected_chain_id}; check which network you point at")
        if not w3.eth.get_code(token):
            raise PaymentError(f"no contract at token address {token} on chain {chain_id}; "
                               "check token_address and the chain the Web3 is connected to")
        batch = None
        if batch_at:
            code = bytes(w3.eth.get_code(batch_at))
            if not code:
                raise PaymentError(f"no contract at batch address {batch_at} on chain {chain_id}; "
                                   "check golem.payment.batch-address (or leave it empty to pay one by one)")
            artifact = load_artifact(BATCH_CONTRACT)
            # The payer approves this contract to move its tokens: it must be ours, unchanged.
            if code != bytes.fromhex(str(artifact["runtime_bytecode"]).removeprefix("0x")):
                raise PaymentError(f"the contract at batch address {batch_at} on chain {chain_id} is not golem-dask's "
                                   f"batch contract ({BATCH_CONTRACT}), and the payer would let it move its tokens; "
                                   "deploy the shipped one ('golem-dask devnet' does) or leave "
                                   "golem.payment.batch-address empty to pay one by one")
            batch = w3.eth.contract(address=batch_at, abi=artifact["abi"])
    return Connection(w3, chain_id, token_contract(w3, token), batch, lock, devnet)
