"""Making the requestor's payer from ``golem.payment.*`` config, or on the embedded devnet."""

from __future__ import annotations

import os
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from golem_dask import config
from golem_dask.chain.devnet import Devnet
from golem_dask.chain.rpc import connect
from golem_dask.chain.units import to_wei
from golem_dask.errors import ConfigError
from golem_dask.payment.ethereum import DEVNET_PLATFORM, EthereumPayer
from golem_dask.payment.fees import GWEI
from golem_dask.payment.ledger import Ledger
from golem_dask.protocol.identity import Wallet


def requestor_wallet() -> Wallet:
    """The requestor's key from ``golem.payment.keystore`` or the ``key-env`` variable."""
    keystore = config.get("payment.keystore")
    if keystore:
        return Wallet.from_keystore(os.path.expanduser(keystore), config.get("payment.keystore-password-env"))
    return Wallet.from_env(config.get("payment.key-env"))


def payer_from_config(platform: str | None = None, on_step: Callable[[str], None] | None = None) -> EthereumPayer:
    """A payer on the chain named by ``golem.payment.*`` config, with the file ledger.

    Examples
    --------
    >>> import dask
    >>> with dask.config.set({"golem.payment.rpc-url": None}):  # doctest: +ELLIPSIS
    ...     payer_from_config()
    Traceback (most recent call last):
    ...
    golem_dask.errors.ConfigError: golem.payment.rpc-url is not set; ...
    """
    url = config.get("payment.rpc-url")
    if not url:
        raise ConfigError("golem.payment.rpc-url is not set; set it (or DASK_GOLEM__PAYMENT__RPC_URL) to the "
                          "chain's JSON-RPC URL, or leave it unset for the embedded devnet")
    token = config.address("payment.token-address")
    if not token:
        raise ConfigError("golem.payment.token-address is not set: the ERC-20 token to pay with")
    wallet = requestor_wallet()
    chain_id = config.get("payment.chain-id")
    return EthereumPayer(
        connect(url),
        wallet=wallet,
        token_address=token,
        batch_address=config.address("payment.batch-address"),
        platform=platform or config.get("payment.platform"),
        ledger=Ledger(config.ledger_path()),
        priority_fee_wei=int(Decimal(str(config.get("payment.priority-fee-gwei"))) * GWEI),
        max_fee_wei=int(Decimal(str(config.get("payment.max-fee-gwei"))) * GWEI),
        expected_chain_id=None if chain_id is None else int(chain_id),
        on_step=on_step,
    )


def embedded_payer(budget: Any, *, eth_wei: int = 10**18, platform: str = DEVNET_PLATFORM) -> EthereumPayer:
    """A payer with a fresh wallet on the process-wide embedded devnet.

    The wallet is generated now, so its ``address`` is known at once; the chain is
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
    >>> payer = embedded_payer(Decimal("50"))
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
    payer = EthereumPayer(Devnet.shared, wallet=Wallet.generate(), platform=platform)
    payer.fund_on_start(tokens, eth_wei)
    return payer


def default_payer(budget: Decimal, platform: str) -> EthereumPayer:
    """The payer a cluster uses when given none: on ``golem.payment.rpc-url`` if set,
    else on the embedded devnet, funded with ``budget``."""
    if config.get("payment.rpc-url"):
        return payer_from_config(platform=platform)
    return embedded_payer(budget, platform=platform)
