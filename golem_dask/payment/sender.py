"""The one place a requestor's transactions are signed, sent and seen through.

A :class:`Sender` owns its wallet's nonces: it picks the next one (from the chain and
from the ledger, whichever is higher), records every signed transaction in the ledger
before broadcasting it, waits for the receipt, replaces a transaction stuck longer than
``replace_after_s`` with the same nonce and a higher fee, and marks the payment confirmed
only once the receipt holds a token ``Transfer`` for every debt it settles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from golem_dask.chain.transfers import missing, token_transfers
from golem_dask.errors import GolemDaskError, PaymentError
from golem_dask.payment.connection import Connection, chain_error
from golem_dask.payment.fees import FeePolicy
from golem_dask.payment.ledger import Debt, Ledger, PaymentRecord
from golem_dask.protocol.identity import Wallet

if TYPE_CHECKING:
    from eth_typing import ChecksumAddress
    from hexbytes import HexBytes
    from web3.types import TxParams

logger = logging.getLogger(__name__)


class Sender:
    """Signs, sends, replaces and confirms one wallet's transactions on one chain.

    Parameters
    ----------
    conn:
        The checked chain connection.
    wallet:
        Signs every transaction.
    ledger:
        Where every signed transaction is written before it is broadcast.
    fees:
        The fee policy.
    receipt_timeout_s, poll_interval_s, replace_after_s:
        How long to wait for a receipt, how often to look, and when to replace.
    on_step:
        Called with ``"signed"``, ``"sent"`` and ``"receipt"`` as a payment passes each
        durable step (crash tests stop the process there).
    """

    def __init__(self, conn: Connection, wallet: Wallet, ledger: Ledger, fees: FeePolicy, *,
                 receipt_timeout_s: float, poll_interval_s: float, replace_after_s: float,
                 on_step: Callable[[str], None] | None = None) -> None:
        self.conn = conn
        self.wallet = wallet
        self.ledger = ledger
        self.fees = fees
        self.receipt_timeout_s = receipt_timeout_s
        self.poll_interval_s = poll_interval_s
        self.replace_after_s = replace_after_s
        self._on_step = on_step

    @property
    def address(self) -> str:
        return self.wallet.address

    def checkpoint(self, step: str) -> None:
        if self._on_step is not None:
            self._on_step(step)

    def submit(self, kind: str, debts: list[Debt], call: Any, what: str) -> PaymentRecord:
        """Sign ``call`` with the next nonce, record it, send it, and see it confirmed.

        Raises
        ------
        PaymentError
            If signing, sending or the receipt fails; the ledger says where it stopped.
        """
        try:
            nonce = self._next_nonce()
            fees = self.fees.fees(self.conn)
            raw, tx_hash, gas = self._sign(call, nonce, fees)
        except GolemDaskError:
            raise
        except Exception as e:
            raise chain_error(self.address, what, e) from e
        payment_id = self.ledger.record_signed(
            self.address, nonce, kind, [d.id for d in debts], tx_hash, raw, fees.get("maxFeePerGas"))
        self.checkpoint("signed")
        self.broadcast(raw, what)
        self.ledger.mark_sent(payment_id)
        self.checkpoint("sent")
        receipt = self.await_receipt(payment_id, call, nonce, fees, gas, what)
        self.checkpoint("receipt")
        return self.finish(payment_id, receipt, what)

    def _sign(self, call: Any, nonce: int, fees: dict[str, int], gas: int | None = None) -> tuple[bytes, str, int]:
        from eth_utils import keccak

        params: dict[str, Any] = {"from": self.address, "nonce": nonce, "chainId": self.conn.chain_id, **fees}
        if gas is not None:
            params["gas"] = gas
        with self.conn.lock:
            # build_transaction estimates gas by executing the call: one that would
            # revert fails here, before anything is signed or recorded.
            tx = call.build_transaction(cast("TxParams", params))
        raw = self.wallet.sign_transaction(dict(tx))
        return raw, "0x" + keccak(raw).hex(), int(tx["gas"])

    def _next_nonce(self) -> int:
        with self.conn.lock:
            pending = int(self.conn.w3.eth.get_transaction_count(cast("ChecksumAddress", self.address), "pending"))
        recorded = self.ledger.max_nonce(self.address)
        return max(pending, -1 if recorded is None else recorded + 1)

    def nonce_used(self, nonce: int) -> bool:
        """Whether a mined transaction of ours already has ``nonce``."""
        with self.conn.lock:
            used = int(self.conn.w3.eth.get_transaction_count(cast("ChecksumAddress", self.address), "latest"))
        return used > nonce

    def broadcast(self, raw: bytes, what: str) -> None:
        try:
            with self.conn.lock:
                self.conn.w3.eth.send_raw_transaction(raw)
        except Exception as e:
            text = str(e).lower()
            # Re-sending what the node already has (after a crash) is not an error.
            if "already known" in text or "already imported" in text or "known transaction" in text:
                return
            raise chain_error(self.address, what, e) from e

    def receipt(self, tx_hashes: Sequence[str]) -> Any:
        """The receipt of whichever of ``tx_hashes`` was mined, or None."""
        from web3.exceptions import TransactionNotFound

        for tx_hash in tx_hashes:
            try:
                with self.conn.lock:
                    return self.conn.w3.eth.get_transaction_receipt(cast("HexBytes", tx_hash))
            except TransactionNotFound:
                continue
        return None

    def await_receipt(self, payment_id: str, call: Any, nonce: int, fees: dict[str, int], gas: int,
                      what: str) -> Any:
        """Poll for a receipt of any of the payment's transactions; replace it when stuck.

        ``call`` is None for a transaction signed by an earlier process (it is never
        replaced, only waited for).
        """
        started = time.monotonic()
        replaced_at = started
        bump = 0
        hashes = list(self.ledger.payment(payment_id).tx_hashes)
        while True:
            try:
                receipt = self.receipt(hashes)
            except Exception as e:
                raise chain_error(self.address, what, e) from e
            if receipt is not None:
                return receipt
            now = time.monotonic()
            if now - started >= self.receipt_timeout_s:
                raise PaymentError(
                    f"{what}: no receipt for {', '.join(hashes)} after {self.receipt_timeout_s:g}s; the ledger "
                    "keeps it as sent, and the next settle (or 'golem-dask pay') checks the chain first"
                )
            if call is not None and now - replaced_at >= self.replace_after_s:
                bump += 1
                try:
                    new_fees = self.fees.fees(self.conn, bump)
                    raw, tx_hash, _ = self._sign(call, nonce, new_fees, gas)
                except PaymentError as e:  # at the fee cap: keep waiting for the old one
                    logger.warning("%s: cannot replace the stuck transaction: %s", what, e)
                    call = None
                else:
                    self.ledger.add_replacement(payment_id, tx_hash, raw, new_fees.get("maxFeePerGas"))
                    hashes.append(tx_hash)
                    logger.warning("%s: transaction stuck for %.0fs; replaced it with %s (same nonce %d, higher fee)",
                                   what, now - replaced_at, tx_hash, nonce)
                    try:
                        self.broadcast(raw, what)
                    except PaymentError:
                        # Mined meanwhile (the node then calls the nonce too low): the
                        # receipt of one of our hashes comes next; anything else is an error.
                        if not self.nonce_used(nonce):
                            raise
                replaced_at = now
            time.sleep(self.poll_interval_s)

    def finish(self, payment_id: str, receipt: Any, what: str) -> PaymentRecord:
        """Mark a mined payment confirmed if it moved every debt's tokens, else failed."""
        record = self.ledger.payment(payment_id)
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        if receipt["status"] != 1:
            self.ledger.mark_failed(payment_id, f"transaction {tx_hash} reverted")
            raise PaymentError(
                f"{what} reverted on chain in transaction {tx_hash}; check the requestor's token balance "
                f"with payer.balance({self.address!r}) and top it up; the debts are owed again"
            )
        debts = [self.ledger.debt(d) for d in record.debt_ids]
        with self.conn.lock:
            transfers = token_transfers(self.conn.token, receipt)
        unmatched = missing(transfers, self.address, [(d.payee, d.amount_wei) for d in debts])
        if unmatched:
            self.ledger.mark_failed(payment_id, f"transaction {tx_hash} lacks Transfer events for {unmatched}")
            raise PaymentError(
                f"{what}: transaction {tx_hash} succeeded but its receipt lacks Transfer events for {unmatched}; "
                f"{self.conn.token_address} may not be a standard ERC-20 token"
            )
        self.ledger.mark_confirmed(payment_id, tx_hash, int(receipt["blockNumber"]))
        for d in debts:
            logger.info("paid %s tokens to %s (reference %s) in tx %s, block %d, gas %d",
                        d.amount, d.payee, d.invoice_id, tx_hash, receipt["blockNumber"], receipt["gasUsed"])
        return self.ledger.payment(payment_id)
