"""What a provider sells: its settings, the offer it publishes, and which demands it takes.

Pure functions over plain data, so the agent's rules for selling can be read (and
tested) apart from its bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from golem_dask.errors import ProposalRejected
from golem_dask.protocol import constraints as C
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import Offer, Proposal, now_ms
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.protocol.properties import Resources


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """What a provider sells and at what price.

    Examples
    --------
    >>> from decimal import Decimal
    >>> ProviderSettings(
    ...     name="laptop",
    ...     capacity=Resources(cpu_threads=2, memory_bytes=4 * 2**30, storage_bytes=2**30),
    ...     pricing=LinearPricing.per_hour(cpu=Decimal("0.1"), duration=Decimal("0.02")),
    ...     platform="erc20-devnet-glm",
    ... ).name
    'laptop'
    """

    name: str
    capacity: Resources
    pricing: LinearPricing
    platform: str
    debit_note_interval_s: float = 10.0


def offer_constraints(platform: str) -> str:
    """What a provider asks of every demand: a slice, an expiration, an address to bill."""
    return str(C.all_of(
        C.present(P.CPU_THREADS),
        C.present(P.MEM_GIB),
        C.ge(P.EXPIRATION, 1),
        C.present(P.payment_address(platform)),
    ))


def make_offer(settings: ProviderSettings, runtime_properties: dict[str, Any], free: Resources,
               provider_id: str, public_key: bytes) -> Offer:
    """The offer of ``free`` capacity at the settings' prices (``runtime_properties``:
    ``golem.runtime.name`` and what the runtime adds); ``public_key`` is what requestors
    seal secrets to."""
    props: dict[str, Any] = {
        P.NODE_NAME: settings.name,
        P.NODE_PUBKEY: "0x" + public_key.hex(),
        **free.to_properties(),
        **runtime_properties,
        **settings.pricing.to_properties(),
        P.SCHEME: "payu",
        P.DEBIT_NOTE_INTERVAL: int(settings.debit_note_interval_s),
        P.payment_address(settings.platform): provider_id,
    }
    return Offer(properties=props, constraints=offer_constraints(settings.platform), provider_id=provider_id)


class ProposalBook:
    """The proposals a provider made lately, each with the counter-proposal it answered,
    so that an agreement can only bind terms the provider itself stated.

    Entries older than ``ttl_s`` are forgotten, and at most ``max_entries`` are kept.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_ms = int(ttl_s * 1000)
        self.max_entries = max_entries
        self._made: dict[str, tuple[Proposal, Proposal, int]] = {}  # in insertion (= time) order

    def __len__(self) -> int:
        return len(self._made)

    def add(self, ours: Proposal, answered: Proposal) -> None:
        now = now_ms()
        self._made[ours.id] = (ours, answered, now)
        oldest_allowed = now - self.ttl_ms
        while self._made:
            first = next(iter(self._made))
            if len(self._made) <= self.max_entries and self._made[first][2] >= oldest_allowed:
                break
            del self._made[first]

    def get(self, proposal_id: str) -> tuple[Proposal, Proposal] | None:
        """``(our proposal, the counter-proposal it answered)``, if made within the TTL."""
        found = self._made.get(proposal_id)
        if found is None or found[2] < now_ms() - self.ttl_ms:
            return None
        return found[0], found[1]


def check_demand(settings: ProviderSettings, offer: Offer | None, demand: Proposal, free: Resources) -> Resources:
    """The slice ``demand`` asks for, or :class:`~golem_dask.errors.ProposalRejected` saying why not."""
    if offer is None:
        raise ProposalRejected(f"provider {settings.name} has nothing left to sell")
    platform = settings.platform
    props = demand.properties
    reasons = C.explain(C.parse(offer.constraints), props)
    if reasons:
        raise ProposalRejected("demand does not satisfy the offer: " + "; ".join(reasons))
    reasons = C.explain(C.parse(demand.constraints), offer.properties)
    if reasons:
        raise ProposalRejected("offer does not satisfy the demand: " + "; ".join(reasons))
    if props.get(P.CHOSEN_PLATFORM, platform) != platform:
        raise ProposalRejected(f"payment platform {props.get(P.CHOSEN_PLATFORM)!r} not supported")
    if int(props[P.EXPIRATION]) <= now_ms():
        raise ProposalRejected("demand expired")
    try:
        wanted = Resources.from_properties(props)
    except (KeyError, ValueError, ArithmeticError) as e:
        raise ProposalRejected(f"demand does not say what slice it wants: {e}") from e
    if wanted.cpu_threads < 1 or wanted.memory_bytes <= 0 or wanted.storage_bytes < 0:
        raise ProposalRejected(f"demand wants {wanted}: threads and memory must be positive, storage not negative")
    if not wanted.fits_in(free):
        raise ProposalRejected(f"only {free} free, demand wants {wanted}")
    return wanted
