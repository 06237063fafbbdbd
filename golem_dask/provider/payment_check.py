"""A provider's own check that a payment announced to it really arrived on chain."""

from __future__ import annotations

from typing import Any

from golem_dask.chain.deploy import token_contract
from golem_dask.chain.rpc import connect
from golem_dask.chain.transfers import token_transfers
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

    def moved_wei(self, payment: Payment, payee: str) -> int:
        """What the payment's transaction moved from its payer to ``payee``, in wei.

        Raises
        ------
        PaymentError
            If the transaction is not on chain or reverted.
        """
        token = self._contract()
        try:
            receipt = token.w3.eth.get_transaction_receipt(payment.tx_hash)
        except Exception as e:
            raise PaymentError(f"transaction {payment.tx_hash} not found on chain: {e}") from e
        if receipt["status"] != 1:
            raise PaymentError(f"transaction {payment.tx_hash} reverted")
        return sum(t.value_wei for t in token_transfers(token, receipt)
                   if t.receiver == payee and t.sender == payment.payer_addr)
