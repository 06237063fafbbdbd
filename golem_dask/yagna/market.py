"""``YagnaMarket``: the market seam on the user's ``yagna`` daemon.

The requestor flow of Golem's REST API (``golemfactory/ya-client`` specs): the
negotiation (:mod:`~golem_dask.yagna.proposals`), then an agreement created from the
provider's last proposal, confirmed and waited for; activities
(:mod:`~golem_dask.yagna.activities`); debit notes and invoices
(:mod:`~golem_dask.yagna.documents`).

The agreement the daemon returns must hold exactly the provider's last proposal and our
own, name both parties, and be approved: anything else is refused and terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal

from golem_dask import config
from golem_dask.errors import MarketError, NetworkError, ProposalRejected
from golem_dask.market.base import Market, MarketEvent, PaymentDocument, WorkerLink
from golem_dask.protocol.messages import (
    Activity,
    Agreement,
    AgreementState,
    Demand,
    ExeCommand,
    Issuer,
    Offer,
    Payment,
    Proposal,
)
from golem_dask.tasks import Tasks
from golem_dask.yagna import convert
from golem_dask.yagna.activities import Activities
from golem_dask.yagna.api import OK, YagnaDaemon, YagnaError, iso
from golem_dask.yagna.documents import Documents
from golem_dask.yagna.proposals import Proposals, scan_offers
from golem_dask.yagna.vpn import VpnNetwork, connectivity, vpn_range
from golem_dask.yagna.vpn import WorkerLink as VpnWorkerLink

logger = logging.getLogger(__name__)


class YagnaMarket(Market):
    """Buy workers on the market the user's yagna daemon is part of.

    Parameters
    ----------
    daemon:
        The session shared with the :class:`~golem_dask.yagna.payer.YagnaPayer`.
    subnet:
        ``golem.node.debug.subnet`` of the providers to deal with (``golem.yagna.subnet``,
        ``public`` on the public network).
    """

    #: A provider's VM exe-unit opens no sealed transfers: the exe-script carries them
    #: as they are, inside the daemons' own messages.
    seals_secrets = False
    bills_whole_activity = True
    #: The daemon accepts a debit note or invoice only for its whole amount (400 otherwise).
    accepts_part = False

    @property
    def unreachable_hint(self) -> str:  # type: ignore[override]
        if self.connectivity == "vpn":
            return ("on golem.yagna.connectivity vpn the worker reaches it through the daemon's tunnels to its VM, "
                    "under a backchannel that runs with the VM's python3: the image needs python3, and the "
                    "daemon's log tells whether the tunnels opened")
        return ("a provider's VM on the public Golem network cannot connect to this machine: set "
                "golem.yagna.connectivity to vpn (workers then reach the scheduler through the daemon's VPN); "
                "with direct, only providers that reach golem.cluster.scheduler-host work")

    def __init__(self, daemon: YagnaDaemon, subnet: str | None = None) -> None:
        self.daemon = daemon
        self.api = daemon.api
        self.subnet = str(subnet or config.get("yagna.subnet"))
        self.collection_window_s = config.seconds("yagna.collection-window")
        self.proposals = Proposals(daemon, self.subnet)
        self._agreements: dict[str, Agreement] = {}
        self.activities = Activities(daemon)
        self.documents = Documents(daemon, self._usage_vector, self.terminate_agreement)
        self._started = False
        self._closed = False
        #: Agreements given up mid-confirmation, being cancelled or terminated on the daemon.
        self._abandoning = Tasks()
        self.connectivity = connectivity()
        self.vpn_range = vpn_range(config.get("yagna.vpn-range"))
        self._network: VpnNetwork | None = None
        self._network_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"YagnaMarket({self.api.url!r}, subnet={self.subnet!r})"

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.daemon.start()
            self.documents.start()

    async def worker_link(self, agreement: Agreement) -> WorkerLink | None:
        """With ``golem.yagna.connectivity: vpn``: the worker's VM on the cluster's VPN."""
        if self.connectivity != "vpn":
            return None
        async with self._network_lock:
            if self._network is None:
                self._network = await VpnNetwork.create(self.api, self.daemon.identity, self.vpn_range)
        return VpnWorkerLink(self._network, agreement.provider_id)

    async def close(self) -> None:
        if self._closed or not self._started:
            return
        self._closed = True
        for sub_id in self.proposals.subscriptions():
            with contextlib.suppress(Exception):
                await self.unsubscribe(sub_id)
        await self.activities.close()
        if self._network is not None:
            try:
                await self._network.delete()
            except (NetworkError, YagnaError) as e:
                logger.warning("the cluster's VPN %s could not be removed from the daemon: %s", self._network.id, e)
        await self._abandoning.wait(config.seconds("yagna.call-timeout"))
        await self.documents.close()
        await self.daemon.close()

    # -- market -------------------------------------------------------------------

    async def subscribe(self, demand: Demand) -> str:
        return await self.proposals.subscribe(demand)

    async def unsubscribe(self, subscription_id: str) -> None:
        await self.proposals.unsubscribe(subscription_id)

    def events(self, subscription_id: str) -> AsyncIterator[MarketEvent]:
        return self.proposals.events(subscription_id)

    async def scan(self) -> list[Offer]:
        return await scan_offers(self.api, self.subnet)

    async def counter(self, subscription_id: str, proposal_id: str, demand: Demand) -> Proposal:
        return await self.proposals.counter(subscription_id, proposal_id, demand)

    async def create_agreement(self, proposal_id: str, valid_to_ms: int) -> Agreement:
        found = self.proposals.answer(proposal_id)
        if found is None:
            raise MarketError(f"no provider answer {proposal_id} to make an agreement of")
        answer = found[0]
        valid_to = datetime.fromtimestamp(valid_to_ms / 1000, UTC)
        try:
            agreement_id = str(await self.api.call("POST", "/market-api/v1/agreements",
                                                   body={"proposalId": proposal_id, "validTo": iso(valid_to)}))
            return await self._checked(agreement_id, answer, AgreementState.PROPOSAL)
        except BaseException:
            self.proposals.release(proposal_id)
            raise

    async def _checked(self, agreement_id: str, answer: Proposal, state: AgreementState) -> Agreement:
        """The agreement as the daemon holds it, if it holds exactly the two proposals."""
        body = await self.api.call("GET", f"/market-api/v1/agreements/{agreement_id}")
        found = self.proposals.answer(answer.id)
        assert found is not None
        _, ours_id, ours = found
        offer, demand = body.get("offer") or {}, body.get("demand") or {}
        problems = []
        # (Compared as JSON: the messages hold lists as tuples.)
        if convert.json_properties(offer.get("properties") or {}) != convert.json_properties(answer.properties):
            problems.append("its offer is not the provider's last proposal")
        if convert.json_properties(demand.get("properties") or {}) != ours["properties"]:
            problems.append("its demand is not our last proposal")
        if convert.address(body["offer"].get("providerId"), "provider") != answer.provider_id:
            problems.append("it names another provider")
        if convert.address(demand.get("requestorId"), "requestor") != self.daemon.identity:
            problems.append("it names another requestor")
        if problems:
            with contextlib.suppress(MarketError):
                await self.terminate_agreement(agreement_id, "agreement does not match the negotiated terms")
            raise ProposalRejected(f"agreement {agreement_id[:8]} refused: {'; '.join(problems)}")
        valid_to = convert.ms(body.get("validTo"))
        agreement = Agreement(
            id=agreement_id,
            demand=Proposal(Issuer.REQUESTOR, ours["properties"], ours["constraints"], answer.offer_id,
                            answer.demand_id, answer.provider_id, id=ours_id),
            offer=answer,
            requestor_id=self.daemon.identity,
            provider_id=answer.provider_id,
            valid_to_ms=valid_to,
            state=state,
            approved_at_ms=convert.ms(body.get("approvedDate")) or None,
        )
        self._agreements[agreement_id] = agreement
        return agreement

    async def confirm_agreement(self, agreement_id: str, timeout_s: float) -> Agreement:
        agreement = self._agreements.get(agreement_id)
        if agreement is None:
            raise MarketError(f"no agreement {agreement_id}")
        try:
            await self.api.call("POST", f"/market-api/v1/agreements/{agreement_id}/confirm")
            try:
                await self.api.call("POST", f"/market-api/v1/agreements/{agreement_id}/wait",
                                    params={"timeout": timeout_s}, timeout_s=timeout_s + 10)
            except YagnaError as e:
                with contextlib.suppress(MarketError):
                    await self.api.call("POST", f"/market-api/v1/agreements/{agreement_id}/cancel",
                                        ok=(*OK, 404, 409, 410))
                why = "did not approve it in time" if e.status == 408 else f"did not approve it: {e}"
                raise ProposalRejected(f"provider {agreement.provider_id} {why}") from None
            return await self._checked(agreement_id, agreement.offer, AgreementState.APPROVED)
        except ProposalRejected:
            raise  # the provider said no, or did not approve in time: nothing holds it
        except (MarketError, asyncio.CancelledError) as e:  # the daemon may have it approved: end it there
            self._abandoning.spawn(self._abandon(agreement_id, f"{type(e).__name__}: {e}"))
            raise
        finally:
            self.proposals.release(agreement.offer.id)

    async def _abandon(self, agreement_id: str, why: str) -> None:
        """Cancel an agreement whose confirmation failed half-way, or terminate it if the
        provider approved it meanwhile, so it does not hold the provider until it expires."""
        with contextlib.suppress(MarketError):
            await self.api.call("POST", f"/market-api/v1/agreements/{agreement_id}/cancel", ok=(*OK, 404, 409, 410))
        with contextlib.suppress(MarketError):
            await self.terminate_agreement(agreement_id, f"confirmation failed: {why}")

    async def terminate_agreement(self, agreement_id: str, reason: str) -> None:
        await self.api.call("POST", f"/market-api/v1/agreements/{agreement_id}/terminate",
                            body={"message": reason[:1000]}, ok=(*OK, 404, 409, 410))
        logger.debug("terminated agreement %s: %s", agreement_id, reason)

    def _usage_vector(self, agreement_id: str) -> list[str]:
        agreement = self._agreements.get(agreement_id)
        return convert.usage_vector(agreement.offer.properties) if agreement else []

    # -- activity -------------------------------------------------------------------

    async def create_activity(self, agreement_id: str) -> Activity:
        return await self.activities.create(agreement_id)

    async def exec(self, activity_id: str, commands: Sequence[ExeCommand], timeout_s: float) -> list[str]:
        return await self.activities.exec(activity_id, commands, timeout_s)

    def activity_events(self, activity_id: str) -> AsyncIterator[Activity]:
        return self.activities.events(activity_id)

    async def destroy_activity(self, activity_id: str) -> None:
        await self.activities.destroy(activity_id)

    # -- payment ----------------------------------------------------------------------

    def payment_events(self) -> AsyncIterator[PaymentDocument]:
        return self.documents.events()

    async def accept(self, document: PaymentDocument, amount: Decimal) -> None:
        await self.documents.accept(document, amount)

    async def reject(self, document: PaymentDocument, reason: str) -> str | None:
        return await self.documents.reject(document, reason)

    async def notify_payment(self, payment: Payment) -> None:
        """Nothing to do: the daemon tells the provider about the payments it makes."""
