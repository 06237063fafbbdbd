"""Deploying golem-dask's contracts and funding accounts on a development chain.

Used by the embedded devnet, by :class:`~golem_dask.chain.anvil.AnvilNode` users and by
``golem-dask devnet``: one :func:`deploy_contracts` and one :func:`fund` for every chain.
``deployer``/``minter`` are accounts the node signs for (eth-tester's and anvil's
pre-funded dev accounts); public chains have GLM already and need neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from golem_dask import config
from golem_dask.chain.contracts import available_artifacts, load_artifact
from golem_dask.chain.units import to_wei
from golem_dask.errors import PaymentError
from golem_dask.protocol.identity import checksum_address

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress
    from web3 import Web3
    from web3.contract import Contract

__all__ = ["BATCH_CONTRACT", "TOKEN_CONTRACT", "deploy", "deploy_contracts", "fund", "token_contract"]

#: The ERC-20 token golem-dask deploys on development chains (GLM-like, 18 decimals).
TOKEN_CONTRACT = "GolemDaskToken"
#: The stateless contract that pays many providers in one transaction.
BATCH_CONTRACT = "GolemDaskBatch"


def _receipt_timeout() -> float:
    return config.seconds("chain.receipt-timeout")


def token_contract(w3: Web3, address: str) -> Contract:
    """The token at ``address`` as a web3 contract (any ERC-20: our ABI is ERC-20's plus ``mint``)."""
    return w3.eth.contract(address=cast("ChecksumAddress", checksum_address(address)),
                           abi=load_artifact(TOKEN_CONTRACT)["abi"])


def deploy(w3: Web3, deployer: str, name: str, args: Sequence[Any] = (), timeout_s: float | None = None) -> str:
    """Deploy the shipped artefact ``name`` from ``deployer``; returns its checksummed address."""
    artifact = load_artifact(name)
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    timeout = _receipt_timeout() if timeout_s is None else timeout_s
    try:
        tx_hash = factory.constructor(*args).transact({"from": deployer})  # type: ignore[arg-type]
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout)
    except Exception as e:
        raise PaymentError(f"deploying {name} from {deployer} failed: {e}") from e
    if receipt["status"] != 1 or not receipt["contractAddress"]:
        raise PaymentError(f"deploying {name} from {deployer} reverted (tx {tx_hash.hex()}); the shipped "
                           "artefact may be corrupt: reinstall golem-dask")
    return checksum_address(str(receipt["contractAddress"]))


def deploy_contracts(w3: Web3, deployer: str, *, timeout_s: float | None = None) -> dict[str, str | None]:
    """Deploy ``GolemDaskToken`` (``deployer`` becomes its minter) and ``GolemDaskBatch``.

    Returns ``{"token": address, "batch": address or None}`` (``None`` when no batch
    artefact is shipped).

    Raises
    ------
    PaymentError
        If a deployment fails or reverts.
    """
    token = deploy(w3, deployer, TOKEN_CONTRACT, (), timeout_s)
    batch = deploy(w3, deployer, BATCH_CONTRACT, (), timeout_s) if BATCH_CONTRACT in available_artifacts() else None
    return {"token": token, "batch": batch}


def fund(
    w3: Web3,
    token: str | Contract,
    minter: str,
    address: str,
    tokens: Decimal,
    eth_wei: int = 10**18,
    *,
    timeout_s: float | None = None,
) -> None:
    """Send ``eth_wei`` wei of ETH and mint ``tokens`` token units to ``address``.

    Parameters
    ----------
    w3:
        A ``web3.Web3`` connected to the node.
    token:
        The ``GolemDaskToken``: its address or a web3 contract object.
    minter:
        An account the node signs for, holding ETH, that is the token's minter (its deployer).
    address:
        The account to fund.
    tokens:
        Token units to mint (``Decimal``, at most 18 decimals); 0 mints nothing.
    eth_wei:
        Wei of ETH for gas; 0 sends nothing.  The default, 1 ETH, pays for about
        20,000 token transfers at a 1 gwei base fee.

    Raises
    ------
    PaymentError
        If an argument is invalid or a transaction fails or reverts.
    """
    try:
        receiver, sender = checksum_address(address), checksum_address(minter)
    except ValueError as e:
        raise PaymentError(str(e)) from None
    try:
        token_wei = to_wei(Decimal(tokens))
    except (ValueError, ArithmeticError) as e:
        raise PaymentError(f"cannot fund {tokens!r} tokens: {e}") from e
    if token_wei < 0 or eth_wei < 0:
        raise PaymentError("funding amounts must not be negative")
    contract = token_contract(w3, token) if isinstance(token, str) else token
    timeout = _receipt_timeout() if timeout_s is None else timeout_s
    try:
        hashes = []
        if eth_wei:
            hashes.append(w3.eth.send_transaction(cast("Any", {"from": sender, "to": receiver, "value": int(eth_wei)})))
        if token_wei:
            hashes.append(contract.functions.mint(receiver, token_wei).transact({"from": sender}))
        receipts = [w3.eth.wait_for_transaction_receipt(h, timeout=timeout) for h in hashes]
    except Exception as e:
        raise PaymentError(f"funding {receiver} from {sender} failed: {e}") from e
    if any(r["status"] != 1 for r in receipts):
        raise PaymentError(f"a funding transaction from {sender} to {receiver} reverted")
