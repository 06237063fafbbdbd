"""Two-way matching of demands and offers, as every market does it, and the offers a
requestor has verified."""

from __future__ import annotations

import functools
from collections import OrderedDict

from golem_dask import config
from golem_dask.errors import ProtocolError
from golem_dask.protocol import constraints as C
from golem_dask.protocol import wire
from golem_dask.protocol.messages import Demand, Issuer, Offer, Proposal


@functools.lru_cache(maxsize=1024)
def parse_filter(text: str) -> C.Filter:
    """A constraint's parsed filter (parsed once per text)."""
    return C.parse(text)


@functools.lru_cache(maxsize=1024)
def _predicate(text: str) -> C.Predicate:
    return C.predicate(parse_filter(text))


def matches(demand: Demand | Proposal, offer: Offer | Proposal) -> bool:
    """Two-way matching: each side's properties satisfy the other's constraints."""
    return _predicate(demand.constraints)(offer.properties) and _predicate(offer.constraints)(demand.properties)


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


class VerifiedOffers:
    """Offer frames already verified, by their exact bytes: the same frame is checked once.

    A hub forwards a provider's own signed publish frame, byte for byte, to every
    subscription it matches, on every re-subscription and in every scan.  Verification
    is a pure function of those bytes (the signature must recover to the offer's
    provider), so a frame identical to one that passed needs no second check, while a
    frame that differs in any byte (another signature, a changed property) is verified
    from scratch.  Only the frozen :class:`Offer` is kept, at most ``size`` of them
    (``golem.hub.verified-offers``), least recently seen dropped first.

    Examples
    --------
    >>> from golem_dask.protocol.identity import Wallet
    >>> alice = Wallet.from_key("11" * 32)
    >>> data = wire.frame(wire.seal(alice, "publish", Offer({}, "(&)", alice.address)))
    >>> seen = VerifiedOffers(size=10)
    >>> seen.offer(data) == seen.offer(data), len(seen)
    (True, 1)
    >>> seen.offer(data.replace(b"(&)", b"(|)"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    golem_dask.errors.ProtocolError: bad signature: signed by 0x..., not by 0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A
    """

    def __init__(self, size: int | None = None) -> None:
        self._size = size
        self._offers: OrderedDict[bytes, Offer] = OrderedDict()

    @property
    def size(self) -> int:
        return int(config.get("hub.verified-offers")) if self._size is None else self._size

    def __len__(self) -> int:
        return len(self._offers)

    def clear(self) -> None:
        self._offers.clear()

    def offer(self, data: bytes, max_frame: int = wire.MAX_FRAME_BYTES) -> Offer:
        """The offer in a publish frame, verified as signed by its provider.

        Raises
        ------
        ProtocolError
            If the frame is malformed, its signature is bad, or it holds no offer of
            its signer.
        """
        if type(data) is not bytes:
            raise ProtocolError(f"a frame is bytes, not {type(data).__name__}")
        known = self._offers.get(data)
        if known is not None and len(data) - 4 <= max_frame:
            self._offers.move_to_end(data)
            return known
        envelope = wire.unframe(data, max_frame)
        offer = wire.verify(envelope)
        if not isinstance(offer, Offer) or offer.provider_id != envelope.sender:
            raise ProtocolError("an offer not signed by its provider")
        self._offers[data] = offer
        size = self.size
        while len(self._offers) > size:
            self._offers.popitem(last=False)
        return offer


#: The requestor process's verified offer frames (every market on a hub uses it).
verified_offers = VerifiedOffers()
