"""``golem-dask provider``: a provider agent selling this machine through a hub.

The daemon connects its :class:`~golem_dask.provider.agent.ProviderAgent` to a hub, answers
requestors' calls (only the agent's negotiation, activity and payment methods, and only
about the caller's own agreements), pushes activity states, debit notes and invoices back,
re-publishes its offer before it expires, and reconnects when the hub restarts.

Every invoice is kept on disk (:class:`~golem_dask.provider.receivables.Receivables`)
and re-sent until it is paid or rejected; a payment announced to the daemon counts only
once checked on chain, against its own invoices, each transaction once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from decimal import Decimal
from typing import Any

from golem_dask import config
from golem_dask.chain.units import to_wei
from golem_dask.errors import GolemDaskError, MarketError, NetworkError
from golem_dask.market.link import PROVIDER_METHODS, REMOTE_ERRORS, HubLink
from golem_dask.protocol import wire
from golem_dask.protocol.messages import Activity, Agreement, DebitNote, Invoice, Offer, Payment, now_ms
from golem_dask.provider.agent import ProviderAgent
from golem_dask.provider.payment_check import PaymentCheck
from golem_dask.provider.receivables import Receivables
from golem_dask.tasks import Tasks

logger = logging.getLogger(__name__)


class ProviderDaemon:
    """Runs one agent on a hub.

    Parameters
    ----------
    agent:
        The agent (capacity, prices, runtime).
    wallet:
        The provider's wallet; its address is the agent's id and payment address.
    hub_url:
        ``tcp://HOST:PORT``.
    payment_check:
        Verifies announced payments on chain (without one, an announcement is taken at its
        word: for a provider that sells only to requestors it trusts).
    receivables:
        Where invoices wait to be paid (default: in memory).
    """

    def __init__(self, agent: ProviderAgent, wallet: Any, hub_url: str, payment_check: PaymentCheck | None = None,
                 receivables: Receivables | None = None) -> None:
        if agent.id != wallet.address:
            raise MarketError("the agent's id must be its wallet's address")
        self.agent = agent
        self.link = HubLink(hub_url, wallet, "provider", self._on_message, self._on_connect)
        self.payment_check = payment_check
        # With a chain to check on, a payment counts towards the payment timeout only once found
        # there; without one, the announcement is all this provider can know.
        agent.trusts_announcements = payment_check is None
        self._receivables = receivables
        self._crediting = asyncio.Lock()
        self._closing = False
        self.verified: list[tuple[str, Decimal]] = []
        self._outbox: collections.deque[tuple[str, Any]] = collections.deque(maxlen=10_000)
        self._tasks = Tasks()
        self._requestors: dict[str, str] = {}  # agreement id -> requestor address
        #: Debit notes and invoices sent, by id -> their requestor: only it may accept or reject them.
        self._addressees: collections.OrderedDict[str, str] = collections.OrderedDict()

    @property
    def receivables(self) -> Receivables:
        """Where invoices wait to be paid (made at first use when none was given)."""
        if self._receivables is None:
            self._receivables = Receivables(":memory:")
        return self._receivables

    # -- the agent's link to its market ------------------------------------------------

    async def publish(self, offer: Offer) -> None:
        with contextlib.suppress(NetworkError):  # re-published on reconnect anyway
            await self.link.send("publish", offer)

    async def withdraw(self, offer_id: str) -> None:
        with contextlib.suppress(NetworkError):
            await self.link.send("withdraw", {"offer_id": offer_id})

    async def send(self, message: Activity | DebitNote | Invoice) -> None:
        requestor = self._requestors.get(message.agreement_id)
        if isinstance(message, Invoice):
            # On disk before it leaves: re-sent until paid, also after a restart.
            await asyncio.to_thread(self.receivables.add, message)
            requestor = message.recipient_id
        if requestor is None:
            return
        if isinstance(message, (DebitNote, Invoice)):
            self._addressees[message.id] = requestor
            while len(self._addressees) > 100_000:
                self._addressees.popitem(last=False)
        payload = {"to": requestor, "message": message}
        try:
            await self.link.send("push", payload)
        except NetworkError:
            # The hub is away: keep it for when it is back (an invoice must not be lost).
            self._outbox.append(("push", payload))

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self.link.start(config.seconds("hub.connect-timeout"))
        await self.agent.connect(self)
        self._tasks.spawn(self._refresh(), "provider-refresh")
        self._tasks.spawn(self._resend_unpaid(), "provider-resend")
        logger.info("provider %s selling %s on %s", self.agent.settings.name, self.agent.settings.capacity, self.link.url)

    async def close(self) -> None:
        self._closing = True
        await self._tasks.cancelled()
        await self.agent.close()
        await self.link.close()

    async def run_forever(self) -> None:
        """Serve until SIGINT or SIGTERM, then end every agreement cleanly."""
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def _on_connect(self) -> None:
        if self.agent.offer is not None:
            await self.link.send("publish", self.agent.offer)
        while self._outbox:
            kind, payload = self._outbox[0]
            await self.link.send(kind, payload)
            self._outbox.popleft()

    async def _resend_unpaid(self) -> None:
        """Re-send invoices that are neither paid nor rejected (the requestor may have been
        away, or its answer lost), until ``golem.provider.invoice-retention`` passes."""
        interval_ms = int(config.seconds("provider.invoice-resend") * 1000)
        while True:
            await asyncio.sleep(interval_ms / 1000)
            if self._receivables is None:
                continue  # nothing was ever invoiced
            now = now_ms()
            due = await asyncio.to_thread(self.receivables.due_for_resend, now - interval_ms,
                                          now - int(config.seconds("provider.invoice-retention") * 1000))
            for invoice in due:
                with contextlib.suppress(NetworkError):
                    await self.link.send("push", {"to": invoice.recipient_id, "message": invoice})
                    await asyncio.to_thread(self.receivables.mark_sent, invoice.id)
                    logger.info("re-sent unpaid invoice %s for agreement %s to %s", invoice.id,
                                invoice.agreement_id, invoice.recipient_id)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(config.seconds("hub.offer-refresh"))
            if self.agent.offer is not None:
                await self.publish(self.agent.offer)

    # -- requestors' calls ----------------------------------------------------------------

    async def _on_message(self, envelope: wire.Envelope, payload: Any) -> None:
        if envelope.kind == "call" and isinstance(payload, dict) and self._closing:
            with contextlib.suppress(NetworkError):
                await self.link.send("reply", {"to": envelope.sender, "call_id": payload.get("call_id"), "ok": False,
                                               "error": f"provider {self.agent.settings.name} is shutting down",
                                               "error_type": "MarketError"})
        elif envelope.kind == "call" and isinstance(payload, dict):
            # Calls may take long (an exe-script): never block the link's reader.
            self._tasks.spawn(self._answer(envelope.sender, payload), f"call-{payload.get('method')}")
        elif envelope.kind == "error":
            logger.warning("hub: %s", payload.get("reason") if isinstance(payload, dict) else payload)

    async def _check_caller(self, caller: str, method: str, args: list[Any]) -> None:
        agent = self.agent
        if method == "approve":
            agreement = args[0]
            if not isinstance(agreement, Agreement) or agreement.requestor_id != caller:
                raise MarketError("an agreement can only be signed by its requestor")
            return
        if method in ("terminate", "create_activity"):
            owner = self._requestors.get(str(args[0]))
        elif method in ("exec", "destroy_activity"):
            agreement = agent.agreement_of(str(args[0]))
            owner = self._requestors.get(agreement.id) if agreement else None
        elif method == "on_payment":
            # Its payer announces it, for agreements of its own here and nothing else.
            payment = args[0] if isinstance(args[0], Payment) else None
            owner = payment.payer_addr if payment is not None else None
            if payment is not None and owner == caller:
                named = [await self._agreement_requestor(a) for a in payment.agreement_ids]
                named += [await self._document_requestor(i) for i in payment.invoice_ids]
                if not named or any(n != caller for n in named):
                    owner = None
        elif method in ("on_accepted", "on_rejected"):
            # Accepting or rejecting a document moves what this provider is owed: its addressee only.
            owner = await self._document_requestor(str(args[0]) if args else "")
        else:
            return  # on_proposal concerns nothing of anyone else
        if owner != caller:
            raise MarketError(f"{method} refused: that is not {caller}'s agreement")

    async def _agreement_requestor(self, agreement_id: str) -> str | None:
        """Who an agreement of this provider is with: approved since this daemon started, or
        invoiced before (read off the event loop)."""
        return self._requestors.get(agreement_id) or await asyncio.to_thread(
            self.receivables.requestor_of_agreement, agreement_id)

    async def _document_requestor(self, document_id: str) -> str | None:
        """Who a debit note or invoice of this provider was sent to (invoices also from the
        store, read off the event loop)."""
        return self._addressees.get(document_id) or await asyncio.to_thread(
            self.receivables.requestor_of, document_id)

    async def _answer(self, caller: str, payload: dict[str, Any]) -> None:
        method, args = str(payload.get("method")), list(payload.get("args") or [])
        reply: dict[str, Any] = {"to": caller, "call_id": payload.get("call_id")}
        try:
            if method not in PROVIDER_METHODS:
                raise MarketError(f"unknown call {method!r}")
            await self._check_caller(caller, method, args)
            value = await getattr(self.agent, method)(*args)
            if method == "approve":
                self._requestors[value.id] = caller
            if method == "on_payment":
                self._tasks.spawn(self._verify_payment(args[0]), "verify-payment")
            elif method == "on_rejected":
                await asyncio.to_thread(self.receivables.reject, str(args[0]), str(args[1]), caller)
            elif method == "on_accepted" and await asyncio.to_thread(self.receivables.accepted, str(args[0]),
                                                                        Decimal(str(args[1])), caller):
                logger.warning("invoice %s accepted for %s GLM only: that is what is now due", args[0], args[1])
            reply.update(ok=True, value=value)
        except (GolemDaskError, TypeError, ValueError, KeyError) as e:
            kind = next((name for name, cls in REMOTE_ERRORS.items() if isinstance(e, cls)), "MarketError")
            reply.update(ok=False, error=str(e), error_type=kind)
        except asyncio.CancelledError:
            # Shutting down: the caller gets an answer now rather than wait for its timeout.
            reply.update(ok=False, error=f"provider {self.agent.settings.name} is shutting down",
                         error_type="MarketError")
            with contextlib.suppress(NetworkError):
                await self.link.send("reply", reply)
            raise
        with contextlib.suppress(NetworkError):
            await self.link.send("reply", reply)

    async def _verify_payment(self, payment: Payment) -> None:
        if self.payment_check is None:
            # As the agent does for its payment deadlines: without a chain, the word is all
            # there is, and an invoice taken as paid is no longer re-sent for days.
            logger.warning("payment %s announced; this provider has no chain to check it on (--rpc-url, "
                           "--token-address): counted on the requestor's word", payment.tx_hash)
        try:
            # One at a time, in the order announced: a transaction is credited to the
            # first announcements of it, up to what it moved.
            async with self._crediting:
                moved = to_wei(payment.amount) if self.payment_check is None else \
                    await asyncio.to_thread(self.payment_check.moved_wei, payment, self.agent.id)
                credit = await asyncio.to_thread(self.receivables.credit, payment, moved)
        except Exception as e:  # a chain hiccup must not kill the daemon
            logger.error("payment NOT verified: %s (invoices %s)", e, ", ".join(payment.invoice_ids))
            return
        if credit.credited <= 0:
            logger.error("payment NOT credited: %s moved nothing to us that is not counted already "
                         "(claimed %s GLM for %s)", payment.tx_hash, payment.amount,
                         ", ".join(payment.invoice_ids or payment.agreement_ids))
            return
        self.verified.append((payment.tx_hash, credit.credited))
        for agreement_id in credit.agreements:
            self.agent.credit(agreement_id, await asyncio.to_thread(self.receivables.paid, agreement_id))
        # Printed, not only logged: the operator (and the tests) read this line.
        checked = "verified" if self.payment_check is not None else "taken at its word"
        print(f"payment {checked}: {credit.credited} GLM in {payment.tx_hash} for invoices "
              f"{', '.join(payment.invoice_ids)}" + (f" (paid in full: {', '.join(credit.paid_invoices)})"
                                                      if credit.paid_invoices else ""), flush=True)
