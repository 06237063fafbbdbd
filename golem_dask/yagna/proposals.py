"""Negotiating on the yagna daemon's market: the demand, offers, counter-proposals.

The demand goes out decorated by the allocation and its events are long-polled; a
provider's first proposal is an offer (:class:`~golem_dask.market.base.OfferReceived`),
and its answer to a counter-proposal must keep the prices it offered: a provider that
raises them after its offer was chosen is refused.  A daemon proposal takes one
counter-proposal or one agreement, so a second agreement on the same offer continues that
offer's negotiation, one agreement at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from golem_dask import config
from golem_dask.errors import MarketError, NetworkError, ProposalRejected, ProtocolError
from golem_dask.market.base import MarketEvent, OfferReceived
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import Demand, Offer, Proposal
from golem_dask.yagna import convert
from golem_dask.yagna.api import OK, YagnaApi, YagnaDaemon, YagnaError

logger = logging.getLogger(__name__)

SUBNET = "golem.node.debug.subnet"
#: What a provider may not change between the offer we chose and the agreement.
PRICE_TERMS = (P.PRICING_MODEL, P.LINEAR_COEFFS, P.USAGE_VECTOR, P.SCHEME)
#: Mid-agreement payment terms a provider may ask for; we agree to them by echoing them.
PAYMENT_TERMS = ("golem.com.scheme.payu.debit-note.interval-sec?", "golem.com.scheme.payu.payment-timeout-sec?")


@dataclass
class _Subscription:
    id: str
    decorations: tuple[dict[str, Any], list[str]]
    queue: asyncio.Queue[MarketEvent | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None



class Proposals:
    """The negotiation half of :class:`~golem_dask.yagna.market.YagnaMarket`."""

    def __init__(self, daemon: YagnaDaemon, subnet: str) -> None:
        self.daemon = daemon
        self.api = daemon.api
        self.subnet = subnet
        self._subs: dict[str, _Subscription] = {}
        self._proposals: dict[str, Proposal] = {}  # providers' proposals by id
        self._ours: dict[str, dict[str, Any]] = {}  # our counter-proposals' bodies by id
        self._answered: dict[str, str] = {}  # provider's answer id -> our counter-proposal id
        self._replies: dict[str, asyncio.Future[Proposal]] = {}  # our counter id -> the answer
        self._unclaimed: dict[str, Proposal | ProposalRejected] = {}  # answers that came before the id
        self._latest: dict[str, str] = {}  # offer -> the provider's last proposal in its negotiation
        self._negotiating: dict[str, asyncio.Lock] = {}
        self._held: dict[str, asyncio.Lock] = {}  # provider's answer -> its negotiation's lock

    def answer(self, proposal_id: str) -> tuple[Proposal, str, dict[str, Any]] | None:
        """A provider's answer to one of our counter-proposals: it, our counter-proposal's
        id and body."""
        ours = self._answered.get(proposal_id)
        if ours is None or proposal_id not in self._proposals:
            return None
        return self._proposals[proposal_id], ours, self._ours[ours]

    def subscriptions(self) -> list[str]:
        return list(self._subs)

    def _body(self, demand: Demand, decorations: tuple[dict[str, Any], list[str]]) -> dict[str, Any]:
        props, constraints = decorations
        properties = {**convert.json_properties(demand.properties), SUBNET: self.subnet,
                      P.CHOSEN_PLATFORM: self.daemon.platform, **props}
        return {"properties": properties,
                "constraints": "(&" + demand.constraints + f"({SUBNET}={self.subnet})" + "".join(constraints) + ")"}

    async def subscribe(self, demand: Demand) -> str:
        decorations = await self.daemon.decorations()
        sub_id = str(await self.api.call("POST", "/market-api/v1/demands", body=self._body(demand, decorations)))
        sub = self._subs[sub_id] = _Subscription(sub_id, decorations)
        sub.task = asyncio.get_running_loop().create_task(self._pump(sub), name=f"golem-yagna-demand-{sub_id[:8]}")
        return sub_id

    async def unsubscribe(self, subscription_id: str) -> None:
        sub = self._subs.pop(subscription_id, None)
        if sub is None:
            return
        if sub.task is not None:
            sub.task.cancel()
        sub.queue.put_nowait(None)
        for attempt in range(3):  # else the demand stays on the daemon until it expires
            try:
                await self.api.call("DELETE", f"/market-api/v1/demands/{subscription_id}", ok=(*OK, 404, 410))
                return
            except NetworkError:
                if attempt == 2:
                    raise
                await asyncio.sleep(1)

    async def events(self, subscription_id: str) -> AsyncIterator[MarketEvent]:
        sub = self._subs.get(subscription_id)
        if sub is None:
            raise MarketError(f"no subscription {subscription_id}")
        while True:
            event = await sub.queue.get()
            if event is None:
                return
            yield event

    async def _pump(self, sub: _Subscription) -> None:
        poll = config.seconds("yagna.poll-timeout")
        while True:
            try:
                found = await self.api.call("GET", f"/market-api/v1/demands/{sub.id}/events",
                                            params={"timeout": poll, "maxEvents": 100}, timeout_s=poll + 10)
            except YagnaError as e:
                if e.status in (404, 410):
                    logger.warning("the daemon dropped demand %s: %s", sub.id, e)
                    sub.queue.put_nowait(None)
                    return
                await asyncio.sleep(1)
                continue
            except NetworkError as e:
                logger.info("demand events: %s", e)
                await asyncio.sleep(1)
                continue
            for event in found if isinstance(found, list) else []:
                try:
                    self._on_event(sub, event)
                except (ProtocolError, KeyError, ValueError) as e:
                    logger.warning("dropping a market event from the daemon: %s", e)

    def _on_event(self, sub: _Subscription, event: dict[str, Any]) -> None:
        kind = event.get("eventType")
        if kind == "ProposalEvent":
            body = event["proposal"]
            previous = body.get("prevProposalId")
            if previous:  # an answer to one of our counter-proposals
                self._resolve(str(previous), convert.proposal(body, sub.id))
                return
            offer = convert.proposal(body, sub.id)
            self._proposals[offer.id] = offer
            sub.queue.put_nowait(OfferReceived(offer))
        elif kind == "ProposalRejectedEvent":
            rejected = str(event.get("proposalId"))
            reason = (event.get("reason") or {}).get("message") or "no reason given"
            self._resolve(rejected, ProposalRejected(f"the provider rejected our proposal: {reason}"))

    def _resolve(self, counter_id: str, answer: Proposal | ProposalRejected) -> None:
        waiting = self._replies.get(counter_id)
        if waiting is None:
            self._unclaimed[counter_id] = answer  # our POST has not returned yet
        elif not waiting.done():
            if isinstance(answer, ProposalRejected):
                waiting.set_exception(answer)
            else:
                waiting.set_result(answer)

    async def scan(self) -> list[Offer]:
        return await scan_offers(self.api, self.subnet)

    async def counter(self, subscription_id: str, proposal_id: str, demand: Demand) -> Proposal:
        sub = self._subs.get(subscription_id)
        offered = self._proposals.get(proposal_id)
        if sub is None or offered is None:
            raise MarketError(f"no proposal {proposal_id} on subscription {subscription_id}")
        body = self._body(demand, sub.decorations)
        for term in PAYMENT_TERMS:  # agree to the provider's mid-agreement payment terms, and only to those:
            if term in offered.properties:  # a payment timeout the provider did not ask for has the daemon
                body["properties"][term] = offered.properties[term]  # pay debit notes beside the invoice
            else:
                body["properties"].pop(term, None)
        # A proposal takes one counter-proposal or one agreement: a second agreement on the
        # same offer answers the provider's last proposal of that negotiation, once the
        # agreement made of it is settled (the lock is held until confirm_agreement ends).
        lock = self._negotiating.setdefault(offered.offer_id, asyncio.Lock())
        await lock.acquire()
        try:
            latest = self._latest.get(offered.offer_id, proposal_id)
            try:
                ours = str(await self.api.call(
                    "POST", f"/market-api/v1/demands/{subscription_id}/proposals/{latest}", body=body))
            except YagnaError as e:
                if e.status in (404, 410):
                    raise ProposalRejected(f"provider {offered.provider_id}'s proposal is gone: {e}") from None
                raise
            self._ours[ours] = {**body, "answering": latest}
            answer = await self._answer(ours, offered)
            self._latest[offered.offer_id] = answer.id
        except BaseException:
            lock.release()
            raise
        self._held[answer.id] = lock
        return answer

    def release(self, proposal_id: str) -> None:
        lock = self._held.pop(proposal_id, None)
        if lock is not None:
            lock.release()

    async def _answer(self, ours: str, offered: Proposal) -> Proposal:
        """The provider's answer to our counter-proposal ``ours``, checked."""
        waiting: asyncio.Future[Proposal] = asyncio.get_running_loop().create_future()
        self._replies[ours] = waiting
        early = self._unclaimed.pop(ours, None)
        if early is not None:
            self._resolve(ours, early)
        timeout = config.seconds("market.approval-timeout")
        try:
            answer = await asyncio.wait_for(waiting, timeout)
        except TimeoutError:
            raise ProposalRejected(f"provider {offered.provider_id} did not answer within {timeout:g}s") from None
        finally:
            self._replies.pop(ours, None)
        answer = _with_offer(answer, offered.offer_id)
        changed = [t for t in PRICE_TERMS if answer.properties.get(t) != offered.properties.get(t)]
        if changed or answer.provider_id != offered.provider_id:
            raise ProposalRejected(f"provider {offered.provider_id} changed its terms after its offer was chosen "
                                   f"({', '.join(changed) or 'issuer'}): refused")
        self._proposals[answer.id] = answer
        self._answered[answer.id] = ours
        return answer


def _with_offer(answer: Proposal, offer_id: str) -> Proposal:

    return dataclasses.replace(answer, offer_id=offer_id)


async def scan_offers(api: YagnaApi, subnet: str) -> list[Offer]:
    """Every offer in ``subnet`` the daemon's market knows (best effort: [] on failure)."""
    try:
        scan_id = await api.call("POST", "/market-api/v1/scan", body={
            "type": "offer", "timeout": 30, "constraints": f"({SUBNET}={subnet})"})
        found = await api.call("GET", f"/market-api/v1/scan/{scan_id}/events",
                               params={"timeout": 2, "maxEvents": 1000}, timeout_s=15)
        with contextlib.suppress(MarketError):
            await api.call("DELETE", f"/market-api/v1/scan/{scan_id}", ok=(*OK, 404))
    except MarketError as e:
        logger.info("scanning the market failed: %s", e)
        return []
    offers = []
    for body in found if isinstance(found, list) else []:
        with contextlib.suppress(ProtocolError, KeyError, ValueError):
            offers.append(Offer(dict(body.get("properties") or {}), str(body.get("constraints") or "(&)"),
                                convert.address(body.get("providerId"), "provider"), id=str(body["offerId"])))
    return offers
