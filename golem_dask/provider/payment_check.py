"""A provider's own check that a payment announced to it really arrived on chain."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from golem_dask.chain.deploy import token_contract
from golem_dask.chain.rpc import connect
from golem_dask.chain.transfers import token_transfers
from golem_dask.chain.units import from_wei
from golem_dask.errors import PaymentError
from golem_dask.protocol.messages import Payment


class PaymentCheck:
    """Verifies on chain that a payment's transaction moved the tokens to us.

    Parameters
    ----------
    rpc_url, token_address:
        The chain and the ERC-20 token the requestor pays with.
    """

    def __init__(self, rpc_url: str, token_address: str) -> None:
        self.rpc_url = rpc_url
        self.token_address = token_address
        self._token: Any = None

    def _contract(self) -> Any:
        if self._token is None:
            self._token = token_contract(connect(self.rpc_url), self.token_address)
        return self._token

    def verify(self, payment: Payment, payee: str) -> Decimal:
        """The amount the transaction moved from the payer to ``payee``; raises if short."""
        token = self._contract()
        try:
            receipt = token.w3.eth.get_transaction_receipt(payment.tx_hash)
        except Exception as e:
            raise PaymentError(f"transaction {payment.tx_hash} not found on chain: {e}") from e
        if receipt["status"] != 1:
            raise PaymentError(f"transaction {payment.tx_hash} reverted")
        moved = sum(t.value_wei for t in token_transfers(token, receipt)
                    if t.receiver == payee and t.sender == payment.payer_addr)
        amount = from_wei(moved)
        if amount < payment.amount:
            raise PaymentError(f"transaction {payment.tx_hash} moved {amount} to us, not {payment.amount}")
        return amount
