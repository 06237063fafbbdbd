"""The embedded market: providers and requestor in one process.

This is the default behind ``GolemCluster()``: no daemon, no network.  It still does the
whole protocol (two-way matching, counter-proposals, agreements the provider approves,
activities, debit notes and invoices), and every message crosses it encoded and decoded
with the wire format, so what works here also works between machines.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from golem_dask.errors import MarketError, ProposalRejected
from golem_dask.market.base import MarketEvent, OfferReceived, OfferWithdrawn
from golem_dask.market.link import PROVIDER_METHODS
from golem_dask.market.matching import matches, offer_proposal, parse_filter
from golem_dask.market.relay import RelayMarket, drain
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.properties import Resources
from golem_dask.protocol.messages import Activity, DebitNote, Demand, Invoice, Offer, new_id
from golem_dask.protocol.wire import decode, encode

T = TypeVar("T")


def _wire(message: T) -> T:
    """Pass a message through the wire format, as a networked backend would."""
    return decode(encode(message))  # type: ignore[no-any-return]


class Seller(Protocol):
    """What the embedded market needs of a provider agent (:class:`~golem_dask.provider.agent.ProviderAgent`).

    Besides these, the market calls the agent's :data:`~golem_dask.market.link.PROVIDER_METHODS`
    by name, as a hub forwards a requestor's calls.
    """

    id: str

    async def connect(self, link: Any) -> None: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Subscription:
    demand: Demand
    queue: asyncio.Queue[MarketEvent | None] = field(default_factory=asyncio.Queue)
    sent: set[str] = field(default_factory=set)


class _Link:
    """One provider agent's connection to the embedded market."""

    def __init__(self, market: LocalMarket) -> None:
        self._market = market

    async def publish(self, offer: Offer) -> None:
        self._market._publish(_wire(offer))

    async def withdraw(self, offer_id: str) -> None:
        self._market._withdraw(offer_id)

    async def send(self, message: Activity | DebitNote | Invoice) -> None:
        self._market._deliver(_wire(message))


class LocalMarket(RelayMarket):
    """An in-process market with the given provider agents.

    Parameters
    ----------
    providers:
        The agents selling here.  The market connects them on ``start`` and closes them
        on ``close``.
    wallet:
        The requestor's key, which signs agreements (a cluster binds its payer's).

    Examples
    --------
    >>> from golem_dask.market.local import LocalMarket
    >>> market = LocalMarket([])  # providers are added with add_provider()
    """

    def __init__(self, providers: Sequence[Seller] = (), wallet: Wallet | None = None) -> None:
        super().__init__(wallet)
        self.providers: dict[str, Seller] = {p.id: p for p in providers}
        self._offers: dict[str, Offer] = {}
        self._subs: dict[str, _Subscription] = {}
        self._started = False

    def __repr__(self) -> str:
        return f"<LocalMarket providers={len(self.providers)} offers={len(self._offers)}>"

    def room_for(self, resources: Resources) -> int | None:
        """How many workers of ``resources`` the agents here can hold at once (None: an
        agent does not say its capacity)."""
        room = 0
        for agent in self.providers.values():
            capacity = getattr(getattr(agent, "settings", None), "capacity", None)
            if capacity is None:
                return None
            room += min(capacity.cpu_threads // max(1, resources.cpu_threads),
                        capacity.memory_bytes // max(1, resources.memory_bytes),
                        capacity.storage_bytes // max(1, resources.storage_bytes))
        return room

    async def add_provider(self, agent: Seller) -> None:
        """Let another agent sell here (connects it at once if the market runs)."""
        self.providers[agent.id] = agent
        if self._started:
            await agent.connect(_Link(self))

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for agent in self.providers.values():
            await agent.connect(_Link(self))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for agent in self.providers.values():
            with contextlib.suppress(Exception):
                await agent.close()
        for sub in self._subs.values():
            sub.queue.put_nowait(None)
        self._end_streams()

    async def _call(self, provider_id: str, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        if method not in PROVIDER_METHODS:
            raise MarketError(f"{method!r} is not a provider call")
        agent = self.providers.get(provider_id)
        if agent is None:
            raise MarketError(f"provider {provider_id} left the market")
        call = getattr(agent, method)(*[_wire(a) for a in args])
        try:
            result = await (asyncio.wait_for(call, timeout_s) if timeout_s is not None else call)
        except asyncio.TimeoutError as e:
            if method == "approve":
                raise ProposalRejected(f"provider did not approve within {timeout_s}s") from e
            raise
        return _wire(result)

    # -- offers -----------------------------------------------------------------------

    def _publish(self, offer: Offer) -> None:
        self._offers[offer.id] = offer
        for sub in self._subs.values():
            self._maybe_send(sub, offer)

    def _maybe_send(self, sub: _Subscription, offer: Offer) -> None:
        if matches(sub.demand, offer):
            proposal = offer_proposal(offer, sub.demand)
            self._remember_offer_proposal(proposal)
            sub.sent.add(offer.id)
            sub.queue.put_nowait(OfferReceived(proposal))

    def _withdraw(self, offer_id: str) -> None:
        self._offers.pop(offer_id, None)
        for sub in self._subs.values():
            if offer_id in sub.sent:
                sub.sent.discard(offer_id)
                sub.queue.put_nowait(OfferWithdrawn(offer_id))

    async def subscribe(self, demand: Demand) -> str:
        self._check_open()
        parse_filter(demand.constraints)
        sub_id = new_id()
        sub = self._subs[sub_id] = _Subscription(_wire(demand))
        for offer in list(self._offers.values()):
            self._maybe_send(sub, offer)
        return sub_id

    async def unsubscribe(self, subscription_id: str) -> None:
        sub = self._subs.pop(subscription_id, None)
        if sub is not None:
            sub.queue.put_nowait(None)

    def events(self, subscription_id: str) -> AsyncIterator[MarketEvent]:
        sub = self._subs.get(subscription_id)
        if sub is None:
            raise MarketError(f"no subscription {subscription_id}")
        return drain(sub.queue)

    async def scan(self) -> list[Offer]:
        return list(self._offers.values())
