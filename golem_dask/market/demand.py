"""From a user's keyword arguments to a Golem demand.

``GolemCluster(cpu=2, memory="4GiB", max_price_per_cpu_hour="0.1")`` becomes a
:class:`DemandSpec`; :meth:`DemandSpec.build` renders it as Golem properties and a
constraint in the filter language, e.g.
``(&(golem.inf.cpu.threads>=2)(golem.inf.mem.gib>=4)(golem.com.pricing.model=linear))``.
The constraint is parsed when the spec is made, so a syntax error surfaces before any
negotiation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from golem_dask import config
from golem_dask.errors import ConfigError
from golem_dask.image import client_versions
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.protocol import constraints as C
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import Demand
from golem_dask.protocol.properties import Resources


def _plain(value: Decimal) -> Decimal | int:
    """Whole numbers as ints, so constraints read ``(golem.inf.mem.gib>=4)``."""
    return int(value) if value == value.to_integral_value() else value


@dataclass(frozen=True, slots=True)
class PriceCaps:
    """The most the requestor pays; ``None`` means no cap."""

    max_price_per_cpu_hour: Decimal | None = None
    max_price_per_hour: Decimal | None = None
    max_start_price: Decimal | None = None

    def violations(self, pricing: LinearPricing) -> list[str]:
        """Why ``pricing`` is over the caps, one reason per cap (empty if within)."""
        checks = [
            ("max_price_per_cpu_hour", self.max_price_per_cpu_hour, pricing.price_per_cpu_hour),
            ("max_price_per_hour", self.max_price_per_hour, pricing.price_per_hour),
            ("max_start_price", self.max_start_price, pricing.start_price),
        ]
        return [
            f"over {name}={cap} (asks {asked.normalize()})"
            for name, cap, asked in checks
            if cap is not None and asked > cap
        ]


@dataclass(frozen=True, slots=True)
class DemandSpec:
    """Everything the requestor asks of one worker's provider.

    Examples
    --------
    >>> spec = DemandSpec.from_kwargs(cpu=2, memory="4GiB")
    >>> str(spec.constraints)  # doctest: +ELLIPSIS
    '(&(golem.inf.cpu.threads>=2)(golem.inf.mem.gib>=4)...'
    """

    resources: Resources
    caps: PriceCaps
    platform: str
    lifetime_s: Decimal
    runtime: str | None = None
    image: str | None = None
    extra_constraints: C.Filter | None = None
    #: Seconds between mid-agreement payments of accepted debit notes (None: at the end).
    payment_interval_s: int | None = None

    @classmethod
    def from_kwargs(
        cls,
        *,
        cpu: int | None = None,
        memory: str | int | None = None,
        storage: str | int | None = None,
        runtime: str | None = None,
        image: str | None = None,
        constraints: str | None = None,
        max_price_per_cpu_hour: Any = None,
        max_price_per_hour: Any = None,
        max_start_price: Any = None,
        platform: str | None = None,
        lifetime: Any = None,
    ) -> DemandSpec:
        """Build a spec from keyword arguments, filling the rest from ``golem.*`` config."""
        threads = config.get("demand.cpu", cpu)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"cpu={threads!r} must be a whole number of threads >= 1")
        resources = Resources(
            cpu_threads=threads,
            memory_bytes=config.byte_size(config.get("demand.memory", memory), "memory"),
            storage_bytes=config.byte_size(config.get("demand.storage", storage), "storage"),
        )
        if resources.memory_bytes <= 0:
            raise ConfigError(f"memory={memory!r} must be more than zero")
        extra_text = config.get("demand.constraints", constraints)
        # Parsing here is the point: a malformed constraint fails before negotiation.
        extra = C.parse(extra_text) if extra_text else None
        caps = PriceCaps(
            config.decimal("pricing.max-price-per-cpu-hour", max_price_per_cpu_hour, "max_price_per_cpu_hour"),
            config.decimal("pricing.max-price-per-hour", max_price_per_hour, "max_price_per_hour"),
            config.decimal("pricing.max-start-price", max_start_price, "max_start_price"),
        )
        return cls(
            resources=resources,
            caps=caps,
            platform=config.get("payment.platform", platform),
            lifetime_s=Decimal(str(config.seconds("market.agreement-lifetime", lifetime))),
            runtime=config.get("demand.runtime", runtime),
            image=image,
            extra_constraints=extra,
            payment_interval_s=int(config.seconds("payment.pay-interval")) if config.get("payment.pay-interval")
            else None,
        )

    @property
    def reserve_s(self) -> Decimal:
        """How far ahead the budget reserves an agreement's worst case: its whole lifetime, or,
        when accepted debit notes are paid as the work goes, two payment periods (the one
        running and the one being paid), topped up after each payment."""
        if self.payment_interval_s:
            return min(self.lifetime_s, Decimal(2 * self.payment_interval_s))
        return self.lifetime_s

    @property
    def constraints(self) -> C.Filter:
        """The filter every matching offer must satisfy."""
        r = self.resources
        return C.all_of(
            C.ge(P.CPU_THREADS, r.cpu_threads),
            C.ge(P.MEM_GIB, _plain(r.memory_gib)),
            C.ge(P.STORAGE_GIB, _plain(r.storage_gib)),
            C.eq(P.RUNTIME_NAME, self.runtime) if self.runtime else None,
            C.eq(P.PRICING_MODEL, "linear"),
            C.present(P.payment_address(self.platform)),
            self.extra_constraints,
        )

    def build(self, requestor_address: str, now_ms: int) -> Demand:
        """The demand to publish, valid for the agreement lifetime from ``now_ms``."""
        props: dict[str, Any] = {
            # The slice of the provider's node one agreement buys.
            **self.resources.to_properties(),
            P.EXPIRATION: now_ms + int(self.lifetime_s * 1000),
            P.payment_address(self.platform): requestor_address,
            P.CHOSEN_PLATFORM: self.platform,
        }
        if self.payment_interval_s:
            props[P.PAYMENT_TIMEOUT] = self.payment_interval_s
        if self.image:
            props[P.IMAGE] = self.image
            # The provider checks its image against these before starting a worker.
            props[P.DASK_VERSIONS] = json.dumps(client_versions(), sort_keys=True)
        return Demand(properties=props, constraints=str(self.constraints))
