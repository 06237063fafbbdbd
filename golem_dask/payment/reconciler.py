"""After a crash: settle what the ledger left signed or sent, by hash and nonce, before
anything new is sent."""

from __future__ import annotations

import logging

from golem_dask.errors import PaymentError
from golem_dask.payment.ledger import Ledger, PaymentRecord
from golem_dask.payment.sender import Sender

logger = logging.getLogger(__name__)


class Reconciler:
    """Matches the ledger's unfinished payments with the chain.

    For each payment signed or sent but not known to be confirmed or failed: a receipt
    of any of its transactions settles it (confirmed, or failed if it reverted); a nonce
    already used by another transaction fails it (its debts are owed again); otherwise
    the very same signed bytes are sent again and waited for.
    """

    def __init__(self, sender: Sender, ledger: Ledger) -> None:
        self.sender = sender
        self.ledger = ledger

    def reconcile(self) -> list[PaymentRecord]:
        """Settle every unfinished payment; returns those now confirmed."""
        done = []
        sender = self.sender
        for record in self.ledger.unfinished(sender.address):
            what = f"unfinished {record.kind} (nonce {record.nonce})"
            receipt = sender.receipt(record.tx_hashes)
            if receipt is None:
                if sender.nonce_used(record.nonce):
                    # None of our hashes is mined, yet the nonce is spent: it went to
                    # another transaction.  The debts are owed again, under a new nonce.
                    self.ledger.mark_failed(record.id, f"nonce {record.nonce} was used by another transaction")
                    continue
                logger.warning("re-sending %s as %s", what, record.tx_hashes[-1])
                sender.broadcast(self.ledger.raw_transaction(record.tx_hashes[-1]), what)
                self.ledger.mark_sent(record.id)
                receipt = sender.await_receipt(record.id, None, record.nonce, {}, 0, what)
            try:
                done.append(sender.finish(record.id, receipt, what))
            except PaymentError as e:
                logger.warning("%s", e)
        return done
