"""Two-way matching of demands and offers, as every market does it."""

from __future__ import annotations

import functools

from golem_dask.protocol import constraints as C
from golem_dask.protocol.messages import Demand, Issuer, Offer, Proposal


@functools.lru_cache(maxsize=1024)
def parse_filter(text: str) -> C.Filter:
    """A constraint's parsed filter (parsed once per text)."""
    return C.parse(text)


def matches(demand: Demand | Proposal, offer: Offer | Proposal) -> bool:
    """Two-way matching: each side's properties satisfy the other's constraints."""
    return C.evaluate(parse_filter(demand.constraints), offer.properties) and C.evaluate(
        parse_filter(offer.constraints), demand.properties
    )


def offer_proposal(offer: Offer, demand: Demand) -> Proposal:
    """A provider's offer as the initial proposal a requestor's subscription receives."""
    return Proposal(
        issuer=Issuer.PROVIDER,
        properties=offer.properties,
        constraints=offer.constraints,
        offer_id=offer.id,
        demand_id=demand.id,
        provider_id=offer.provider_id,
    )
