"""The requestor's side of a hub: ``GolemCluster(market="tcp://HOST:PORT")``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from golem_dask import config
from golem_dask.errors import MarketError, NetworkError, ProposalRejected, ProtocolError
from golem_dask.market.base import MarketEvent, OfferReceived, OfferWithdrawn
from golem_dask.market.link import PROVIDER_METHODS, REMOTE_ERRORS, HubLink
from golem_dask.market.matching import matches, offer_proposal, verified_offers
from golem_dask.market.relay import FINAL_STATES, RelayMarket, drain
from golem_dask.protocol import wire
from golem_dask.protocol.messages import Activity, ActivityState, DebitNote, Demand, Invoice, Offer, new_id

logger = logging.getLogger(__name__)


class HubMarket(RelayMarket):
    """The requestor's side of a hub: ``GolemCluster(market="tcp://HOST:PORT")``.

    Parameters
    ----------
    url:
        ``tcp://HOST:PORT`` of a ``golem-dask hub``.
    wallet:
        The requestor's wallet: it signs every message (the requestor's identity is its
        payment address).
    """

    unreachable_hint = ("the provider's host must reach that address and port: open it in the firewall, or set "
                        "golem.cluster.scheduler-host to an address of this machine the providers can reach")

    def __init__(self, url: str, wallet: Any) -> None:
        super().__init__(wallet)
        self.collection_window_s = config.seconds("hub.collection-window")
        self.url = url
        self.link = HubLink(url, wallet, "requestor", self._on_message, self._on_connect)
        self._subs: dict[str, tuple[Demand, asyncio.Queue[MarketEvent | None]]] = {}
        self._sent_offers: dict[str, set[str]] = {}
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._call_timeout_s = config.seconds("hub.call-timeout")

    def scheduler_host(self) -> str | None:
        """The local address that routes to the hub: providers reach the requestor there."""
        import socket

        host, port = self.link.host, self.link.port
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(address)  # no packet is sent: this only picks the route
                return str(probe.getsockname()[0])
        except OSError as e:
            raise NetworkError(f"no route from this machine to the hub at {self.url}: {e}; set "
                               "golem.cluster.scheduler-host to the address providers can reach") from e

    def __repr__(self) -> str:
        return f"<HubMarket {self.url} connected={self.link.connected}>"

    async def start(self) -> None:
        await self.link.start(config.seconds("hub.connect-timeout"))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.link.close()
        for _, queue in self._subs.values():
            queue.put_nowait(None)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(NetworkError("market closed"))
        self._end_streams()

    async def _on_connect(self) -> None:
        # After a hub restart: subscribe again; the hub resends matching offers.
        for sub_id, (demand, _) in self._subs.items():
            await self.link.send("subscribe", {"sub": sub_id, "demand": demand})

    async def _on_message(self, envelope: wire.Envelope, payload: Any) -> None:
        kind = envelope.kind
        if kind == "event" and envelope.sender == self.link.hub_address:
            self._on_event(payload)
        elif kind in ("scan_result", "error") and envelope.sender == self.link.hub_address:
            fut = self._waiting.pop(str(payload.get("ref")), None)
            if fut is not None and not fut.done():
                if kind == "error":
                    fut.set_exception(MarketError(f"hub: {payload.get('reason')}"))
                else:
                    fut.set_result(payload)
            elif kind == "error":
                logger.warning("hub error: %s", payload.get("reason"))
        elif kind == "reply":
            fut = self._waiting.get(str(payload.get("call_id")))
            expected = getattr(fut, "provider", None) if fut is not None else None
            if fut is None or envelope.sender != expected:
                return  # not ours, or not from the provider we called: ignore
            del self._waiting[str(payload["call_id"])]
            if payload.get("ok"):
                fut.set_result(payload.get("value"))
            else:
                error = REMOTE_ERRORS.get(str(payload.get("error_type")), MarketError)
                fut.set_exception(error(f"provider {envelope.sender}: {payload.get('error')}"))
        elif kind == "push":
            message = payload.get("message")
            if isinstance(message, Activity | DebitNote | Invoice) and self._from_its_provider(envelope.sender, message):
                self._deliver(message)

    def _from_its_provider(self, sender: str, message: Activity | DebitNote | Invoice) -> bool:
        agreement = self._agreements.get(message.agreement_id)
        return agreement is not None and agreement.provider_id == sender

    def _offer_from_frame(self, data: bytes) -> Offer | None:
        try:
            # Verified as signed by its provider (once per exact frame: see VerifiedOffers).
            return verified_offers.offer(data, self.link.max_frame)
        except ProtocolError as e:
            logger.warning("dropping an offer the hub forwarded: %s", e)
            return None

    def _on_event(self, payload: dict[str, Any]) -> None:
        if "gone" in payload:
            gone = str(payload["gone"])
            # Calls it will never answer fail now, not at their timeout.
            for fut in self._waiting.values():
                if getattr(fut, "provider", None) == gone and not fut.done():
                    fut.set_exception(NetworkError(f"provider {gone} disconnected from the hub"))
            for activity_id, provider in list(self._activity_provider.items()):
                history = self._activity_history.get(activity_id, [])
                if provider == gone and not any(h.state in FINAL_STATES for h in history):
                    self._deliver(Activity(activity_id, self._activity_agreement[activity_id], ActivityState.FAILED,
                                           f"provider {gone} disconnected from the hub"))
            return
        sub = self._subs.get(str(payload.get("sub")))
        if sub is None:
            return
        demand, queue = sub
        sent = self._sent_offers.setdefault(str(payload["sub"]), set())
        if "withdrawn" in payload:
            offer_id = str(payload["withdrawn"])
            if offer_id in sent:
                sent.discard(offer_id)
                queue.put_nowait(OfferWithdrawn(offer_id))
            return
        frames = payload["offers"] if "offers" in payload else [payload["offer"]]
        for data in frames if isinstance(frames, list) else []:
            offer = self._offer_from_frame(data)
            if offer is None or offer.id in sent or not matches(demand, offer):
                continue
            sent.add(offer.id)
            proposal = offer_proposal(offer, demand)
            self._remember_offer_proposal(proposal)
            queue.put_nowait(OfferReceived(proposal))

    async def _request(self, ref: str, kind: str, payload: Any, timeout_s: float, provider: str | None = None) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.provider = provider  # type: ignore[attr-defined]
        self._waiting[ref] = fut
        try:
            await self.link.send(kind, payload)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiting.pop(ref, None)

    async def _call(self, provider_id: str, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        self._check_open()
        if method not in PROVIDER_METHODS:
            raise MarketError(f"{method!r} is not a provider call")
        call_id = new_id()
        payload = {"to": provider_id, "call_id": call_id, "method": method, "args": list(args)}
        timeout = timeout_s if timeout_s is not None else self._call_timeout_s
        try:
            return await self._request(call_id, "call", payload, timeout, provider=provider_id)
        except asyncio.TimeoutError as e:
            if method == "approve":
                raise ProposalRejected(f"provider {provider_id} did not approve within {timeout:g}s") from e
            raise NetworkError(f"provider {provider_id} did not answer {method} within {timeout:g}s") from e

    async def subscribe(self, demand: Demand) -> str:
        self._check_open()
        sub_id = new_id()
        self._subs[sub_id] = (demand, asyncio.Queue())
        await self.link.send("subscribe", {"sub": sub_id, "demand": demand})
        return sub_id

    async def unsubscribe(self, subscription_id: str) -> None:
        sub = self._subs.pop(subscription_id, None)
        if sub is not None:
            sub[1].put_nowait(None)
            with contextlib.suppress(NetworkError):
                await self.link.send("unsubscribe", {"sub": subscription_id})

    def events(self, subscription_id: str) -> AsyncIterator[MarketEvent]:
        sub = self._subs.get(subscription_id)
        if sub is None:
            raise MarketError(f"no subscription {subscription_id}")
        return drain(sub[1])

    async def scan(self) -> list[Offer]:
        # The hub answers a page at a time (each fits in a frame), in order of offer id.
        offers: list[Offer] = []
        after: str | None = None
        while True:
            ref = new_id()
            page = await self._request(ref, "scan", {"ref": ref, "after": after}, self._call_timeout_s)
            frames = page.get("offers") if isinstance(page, dict) else None
            offers.extend(o for o in (self._offer_from_frame(f) for f in (frames if isinstance(frames, list) else []))
                          if o is not None)
            following = page.get("next") if isinstance(page, dict) else None
            if not isinstance(following, str) or (after is not None and following <= after):
                return offers  # the last page (or a hub that does not page)
            after = following
