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
               provider_id: str) -> Offer:
    """The offer of ``free`` capacity at the settings' prices (``runtime_properties``:
    ``golem.runtime.name`` and what the runtime adds)."""
    props: dict[str, Any] = {
        P.NODE_NAME: settings.name,
        **free.to_properties(),
        **runtime_properties,
        **settings.pricing.to_properties(),
        P.SCHEME: "payu",
        P.DEBIT_NOTE_INTERVAL: int(settings.debit_note_interval_s),
        P.payment_address(settings.platform): provider_id,
    }
    return Offer(properties=props, constraints=offer_constraints(settings.platform), provider_id=provider_id)


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
    if wanted.cpu_threads < 1 or not wanted.fits_in(free):
        raise ProposalRejected(f"only {free} free, demand wants {wanted}")
    return wanted
