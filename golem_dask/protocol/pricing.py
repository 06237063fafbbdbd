"""The linear pricing model: cost = start price + sum(coeff * usage counter).

In properties (as on the public Golem network) ``golem.com.usage.vector`` names the
counters and ``golem.com.pricing.model.linear.coeffs`` holds one price per counter,
per second of CPU or of wall time, followed by the fixed start price.

Every coefficient is kept exactly as the offer states it (a ``Decimal`` read from its
text).  Usage is multiplied by it without rounding and only the amount due is rounded,
to whole wei, the same way on both sides.  Prices per hour (what users cap and read) are
derived from the coefficients and rounded to the wei: an hourly price that a provider
turned into a per-second coefficient (0.0501 / 3600 has no finite decimal form) comes
back as exactly the price it set.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any

from golem_dask.errors import ProtocolError
from golem_dask.protocol import properties as P

WEI = Decimal("1e-18")
_HOUR = Decimal(3600)
#: Digits kept while multiplying usage by prices: far more than any amount needs, so the
#: only rounding is quantize()'s, to whole wei.
_EXACT_DIGITS = 80


def quantize(amount: Decimal) -> Decimal:
    """Round a token amount to whole wei (banker's rounding, as both sides do)."""
    if not amount:
        return Decimal(0)
    with localcontext(prec=_EXACT_DIGITS):
        return amount.quantize(WEI, rounding=ROUND_HALF_EVEN).normalize()


@functools.lru_cache(maxsize=4096)
def _per_hour(per_second: Decimal) -> Decimal:
    # Cached: the result is rounded and normalized, so equal coefficients (however
    # spelled) give the same Decimal; offers on a market share few distinct prices.
    with localcontext(prec=_EXACT_DIGITS):
        return quantize(per_second * _HOUR)


@dataclass(frozen=True, slots=True)
class LinearPricing:
    """Prices per CPU second and per second of wall time, plus a start price.

    Examples
    --------
    >>> p = LinearPricing.per_hour(cpu=Decimal("0.36"), duration=Decimal("0.036"))
    >>> p.cost({P.USAGE_CPU_SEC: Decimal(100), P.USAGE_DURATION_SEC: Decimal(100)})
    Decimal('0.011')
    """

    price_per_cpu_second: Decimal
    price_per_second: Decimal
    start_price: Decimal = Decimal(0)

    @classmethod
    def per_hour(cls, cpu: Decimal, duration: Decimal, start: Decimal = Decimal(0)) -> LinearPricing:
        """Build from prices per CPU hour and per hour of wall time (a provider's settings).

        The per-second coefficients carry 28 significant digits; :attr:`price_per_cpu_hour`
        gives back exactly ``cpu`` for any price with at most 18 decimals.
        """
        return cls(cpu / _HOUR, duration / _HOUR, start)

    @property
    def price_per_cpu_hour(self) -> Decimal:
        """The CPU price per hour, to the wei."""
        return _per_hour(self.price_per_cpu_second)

    @property
    def price_per_hour(self) -> Decimal:
        """The wall-time price per hour, to the wei."""
        return _per_hour(self.price_per_second)

    def to_properties(self) -> dict[str, Any]:
        return {
            P.PRICING_MODEL: "linear",
            P.USAGE_VECTOR: (P.USAGE_CPU_SEC, P.USAGE_DURATION_SEC),
            P.LINEAR_COEFFS: (self.price_per_cpu_second, self.price_per_second, self.start_price),
        }

    @classmethod
    def from_properties(cls, props: Mapping[str, Any]) -> LinearPricing:
        """Read the model from offer properties; counters may come in any order."""
        if props.get(P.PRICING_MODEL) != "linear":
            raise ProtocolError(f"unsupported pricing model {props.get(P.PRICING_MODEL)!r}")
        vector = list(props.get(P.USAGE_VECTOR) or ())
        coeffs = list(props.get(P.LINEAR_COEFFS) or ())
        if len(coeffs) != len(vector) + 1:
            raise ProtocolError(
                f"{P.LINEAR_COEFFS} needs {len(vector) + 1} prices for {len(vector)} counters"
            )
        try:
            prices = {name: Decimal(str(c)) for name, c in zip(vector, coeffs)}
            start = Decimal(str(coeffs[-1]))
        except ArithmeticError as e:
            raise ProtocolError(f"malformed price in {P.LINEAR_COEFFS}: {coeffs!r}") from e
        unknown = set(prices) - {P.USAGE_CPU_SEC, P.USAGE_DURATION_SEC}
        if unknown:
            raise ProtocolError(f"unsupported usage counters {sorted(unknown)}")
        values = [prices.get(P.USAGE_CPU_SEC, Decimal(0)), prices.get(P.USAGE_DURATION_SEC, Decimal(0)), start]
        if any(not v.is_finite() or v < 0 for v in values):
            raise ProtocolError(f"negative or non-finite price in {P.LINEAR_COEFFS}: {coeffs!r}")
        return cls(*values)

    def cost(self, usage: Mapping[str, Decimal]) -> Decimal:
        """The amount due for ``usage`` (counter name -> value), rounded to wei."""
        cpu = Decimal(usage.get(P.USAGE_CPU_SEC, 0))
        duration = Decimal(usage.get(P.USAGE_DURATION_SEC, 0))
        with localcontext(prec=_EXACT_DIGITS):
            exact = self.start_price + cpu * self.price_per_cpu_second + duration * self.price_per_second
        return quantize(exact)

    def estimate(self, threads: int, seconds: Decimal, utilisation: Decimal = Decimal(1)) -> Decimal:
        """Expected cost of ``threads`` busy at ``utilisation`` for ``seconds``."""
        cpu = Decimal(threads) * seconds * utilisation
        return self.cost({P.USAGE_CPU_SEC: cpu, P.USAGE_DURATION_SEC: seconds})

    def worst_case(self, threads: int, seconds: Decimal) -> Decimal:
        """The most an agreement of ``threads`` can cost over ``seconds``."""
        return self.estimate(threads, seconds, Decimal(1))
