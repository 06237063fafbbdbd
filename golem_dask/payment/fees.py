"""What a payment transaction offers to pay for gas: EIP-1559 fees under a cap."""

from __future__ import annotations

from golem_dask.errors import PaymentError
from golem_dask.payment.connection import Connection

GWEI = 10**9


class FeePolicy:
    """Twice the base fee plus a tip, never above ``max_fee_wei``; each replacement of
    a stuck transaction (``bump``) raises both by 25 %, as nodes require.

    Parameters
    ----------
    priority_fee_wei:
        The tip per gas (``golem.payment.priority-fee-gwei``).
    max_fee_wei:
        The most per gas, base fee included (``golem.payment.max-fee-gwei``); ``None``
        for no cap.
    """

    def __init__(self, priority_fee_wei: int = GWEI, max_fee_wei: int | None = None) -> None:
        self.priority_fee_wei = int(priority_fee_wei)
        self.max_fee_wei = None if max_fee_wei is None else int(max_fee_wei)

    def __repr__(self) -> str:
        return f"FeePolicy(priority_fee_wei={self.priority_fee_wei}, max_fee_wei={self.max_fee_wei})"

    @staticmethod
    def _raise(value: int, bump: int) -> int:
        return value * (125 ** bump) // (100 ** bump)

    def fees(self, conn: Connection, bump: int = 0) -> dict[str, int]:
        """Fee fields for a transaction now (legacy ``gasPrice`` on a chain without a base fee).

        Raises
        ------
        PaymentError
            If the base fee plus the tip is already above the cap.
        """
        with conn.lock:
            base = conn.w3.eth.get_block("latest").get("baseFeePerGas")
            if base is None:
                return {"gasPrice": self._raise(int(conn.w3.eth.gas_price), bump)}
        tip = self._raise(self.priority_fee_wei, bump)
        max_fee = self._raise(2 * int(base) + self.priority_fee_wei, bump)
        if self.max_fee_wei is not None:
            if int(base) + tip > self.max_fee_wei:
                raise PaymentError(
                    f"the chain's base fee ({int(base)} wei) plus tip exceeds the fee cap "
                    f"({self.max_fee_wei} wei, golem.payment.max-fee-gwei); raise the cap or wait"
                )
            max_fee = min(max_fee, self.max_fee_wei)
            tip = min(tip, max_fee)
        return {"maxFeePerGas": max_fee, "maxPriorityFeePerGas": tip}
