"""The budget: token amounts reserved for agreements, out of a fixed total.

The budget is an allocation: signing an agreement reserves its worst-case cost (over its
lifetime, or over two payment periods when it is paid as it goes, topped up after each
payment), paying it turns the reservation into what was spent and releases the rest.
"""

from __future__ import annotations

from decimal import Decimal

from golem_dask.errors import BudgetExceededError


class Budget:
    """Token amounts reserved for agreements, out of a fixed total.

    Examples
    --------
    >>> b = Budget(Decimal("1"))
    >>> b.reserve("a", Decimal("0.6"))
    >>> b.can_afford(Decimal("0.5"))
    False
    >>> b.settle("a", Decimal("0.1"))
    >>> b.remaining
    Decimal('0.9')
    """

    def __init__(self, total: Decimal) -> None:
        if total < 0:
            raise ValueError("budget must be >= 0")
        self.total = total
        self.spent = Decimal(0)
        self._reserved: dict[str, Decimal] = {}

    @property
    def reserved(self) -> Decimal:
        return sum(self._reserved.values(), Decimal(0))

    @property
    def remaining(self) -> Decimal:
        return self.total - self.spent - self.reserved

    def can_afford(self, amount: Decimal) -> bool:
        return amount <= self.remaining

    def shortfall(self, amount: Decimal) -> str:
        """Why ``amount`` cannot be reserved now, and what to change."""
        return (f"budget {self.total} GLM: {self.remaining} left after {self.spent} spent and "
                f"{self.reserved} reserved, but the next agreement may cost up to {amount}; "
                f"raise budget= or lower golem.market.agreement-lifetime")

    def reserve(self, key: str, amount: Decimal) -> None:
        """Reserve ``amount`` for ``key`` or raise BudgetExceededError."""
        if not self.can_afford(amount):
            raise BudgetExceededError(self.shortfall(amount))
        self._reserved[key] = amount

    def top_up(self, key: str, amount: Decimal) -> bool:
        """Hold ``amount`` for ``key`` again (after part of it was spent); False, holding
        what it could, when the budget left cannot cover it.

        >>> b = Budget(Decimal("1"))
        >>> b.reserve("a", Decimal("0.4")); b.spend("a", Decimal("0.4"))
        >>> b.top_up("a", Decimal("0.4")), b.top_up("a", Decimal("0.7")), b.reserved_for("a")
        (True, False, Decimal('0.6'))
        """
        held = self._reserved.get(key, Decimal(0))
        if amount <= held:
            return True
        enough = amount - held <= self.remaining
        self._reserved[key] = amount if enough else held + max(Decimal(0), self.remaining)
        return enough

    def reserved_for(self, key: str) -> Decimal:
        return self._reserved.get(key, Decimal(0))

    def rekey(self, old: str, new: str) -> None:
        self._reserved[new] = self._reserved.pop(old)

    def shrink(self, key: str, amount: Decimal) -> None:
        """Hold at most ``amount`` for ``key`` (the rest returns to what is available)."""
        if key in self._reserved:
            self._reserved[key] = min(self._reserved[key], amount)

    def release(self, key: str) -> None:
        self._reserved.pop(key, None)

    def spend(self, key: str, amount: Decimal) -> None:
        """Pay part of a reservation now; the rest stays reserved."""
        if key in self._reserved:
            self._reserved[key] = max(Decimal(0), self._reserved[key] - amount)
        self.spent += amount

    def settle(self, key: str, amount: Decimal) -> None:
        """Turn a reservation into ``amount`` spent."""
        self._reserved.pop(key, None)
        self.spent += amount
