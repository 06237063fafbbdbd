"""What a lost connection to the daemon leaves there, against a recorded daemon: an
agreement whose confirmation fails half-way is cancelled and terminated, so it does not
hold the provider until it expires; a demand whose withdrawal fails is withdrawn again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from golem_dask.errors import NetworkError
from golem_dask.protocol.messages import Agreement, Issuer, Proposal
from golem_dask.yagna.market import YagnaMarket


class LostWait:
    """The part of YagnaDaemon the market uses; ``/wait`` loses its connection."""

    def __init__(self) -> None:
        self.api = self
        self.url = "http://127.0.0.1:1"
        self.identity = "0x" + "22" * 20
        self.calls: list[str] = []

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append(f"{method} {path}")
        if path.endswith("/wait"):
            raise NetworkError("the daemon closed the connection")
        return None


def test_an_agreement_whose_approval_wait_fails_is_cancelled_and_terminated() -> None:
    daemon = LostWait()
    market = YagnaMarket(daemon, subnet="test")  # type: ignore[arg-type]
    offer = Proposal(Issuer.PROVIDER, {}, "(&)", "offer-1", "demand-1", "0x" + "11" * 20)
    market._agreements["agr"] = Agreement(id="agr", demand=offer, offer=offer, requestor_id=daemon.identity,
                                          provider_id=offer.provider_id, valid_to_ms=0)

    async def main() -> None:
        with pytest.raises(NetworkError):
            await market.confirm_agreement("agr", 5)
        await asyncio.wait(set(market._abandoning), timeout=5)

    asyncio.run(main())
    assert daemon.calls == ["POST /market-api/v1/agreements/agr/confirm", "POST /market-api/v1/agreements/agr/wait",
                            "POST /market-api/v1/agreements/agr/cancel", "POST /market-api/v1/agreements/agr/terminate"]


def test_a_demand_whose_withdrawal_loses_its_connection_is_withdrawn_again() -> None:
    from golem_dask.yagna.proposals import Proposals, _Subscription

    class LostDelete(LostWait):
        async def call(self, method: str, path: str, **kwargs: Any) -> Any:
            self.calls.append(f"{method} {path}")
            if method == "DELETE" and self.calls.count(f"{method} {path}") == 1:
                raise NetworkError("the daemon closed the connection")
            return None

    daemon = LostDelete()
    proposals = Proposals(daemon, "test")  # type: ignore[arg-type]

    async def main() -> None:
        proposals._subs["dem-1"] = _Subscription("dem-1", ({}, []))
        await proposals.unsubscribe("dem-1")

    asyncio.run(main())
    assert daemon.calls == ["DELETE /market-api/v1/demands/dem-1"] * 2
