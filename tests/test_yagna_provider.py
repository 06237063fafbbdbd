"""The yagna test provider against a real daemon, driven by a bare requestor over REST.

The daemon is the ``yagna_stack`` fixture's (never one named by the environment: that
may be the user's own).  Every test keeps to a subnet of its own, so it can share a daemon
with other tests.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import pytest
import requests
from yagna_provider import Sandbox, YagnaTestProvider, usage_counters
from yagna_stack import yagna_stack  # noqa: F401

from golem_dask.protocol.pricing import LinearPricing

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.timeout(120)

#: Prices of the providers here: high enough that a few seconds cost more than one wei.
PRICES = {"price_per_second": Decimal("0.001"), "price_per_cpu_second": Decimal("0.002"),
          "start_price": Decimal("0.0001")}


@pytest.fixture
def stack(yagna_stack: Any) -> Any:  # noqa: F811
    return yagna_stack


@pytest.fixture
def subnet() -> str:
    return f"ytp-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def provider(stack: Any, subnet: str, tmp_path: Path):
    before = daemon_connections(stack)
    p = YagnaTestProvider(stack.api_url, stack.provider_key, stack.provider_id, stack.platform, subnet,
                          name="test-provider", debit_note_interval_s=1, workdir=tmp_path / "provider", **PRICES)
    with p:
        yield p
    assert not p.errors, p.errors
    left = daemon_connections(stack) - before
    assert not left, f"connections to the daemon left open by the provider or the test: {left}"


def daemon_connections(stack: Any) -> set[tuple[str, int]]:
    """This process's open TCP connections to the daemon's REST API, by local address (the
    module's daemon may still hold idle connections of earlier tests' HTTP sessions)."""
    port = urlparse(stack.api_url).port
    return {tuple(c.laddr) for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class Requestor:
    """The requestor's side over plain REST: just what these tests need."""

    def __init__(self, stack: Any, subnet: str) -> None:
        self.stack = stack
        self.subnet = subnet
        self.session = requests.Session()
        self.session.trust_env = False  # never a proxy for the daemon on loopback
        self.session.headers["Authorization"] = f"Bearer {stack.requestor_key}"
        self.demand_id: str | None = None
        self.allocation_id: str | None = None

    def call(self, method: str, path: str, expect: tuple[int, ...] = (200, 201, 204), **kw: Any) -> Any:
        kw.setdefault("timeout", 60)
        reply = self.session.request(method, self.stack.api_url.rstrip("/") + path, **kw)
        assert reply.status_code in expect, f"{method} {path} -> {reply.status_code}: {reply.text[:500]}"
        return reply.json() if reply.content else None

    def events(self, path: str) -> list[dict[str, Any]]:
        return self.call("GET", path, params={"timeout": 2, "maxEvents": 20}) or []

    def wait(self, what: str, fn: Any, timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (value := fn()):
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
            time.sleep(0.05)
        return value

    def rent(self, provider_id: str) -> str:
        """Allocation, decorated demand, negotiation, agreement approved: the agreement's id."""
        self.allocation_id = self.call("POST", "/payment-api/v1/allocations", json={
            "totalAmount": "5", "paymentPlatform": self.stack.platform,
            "timeout": iso(datetime.now(UTC) + timedelta(hours=1))})["allocationId"]
        decorations = self.call("GET", "/payment-api/v1/demandDecorations",
                                params={"allocationIds": self.allocation_id})
        properties = {"golem.srv.comp.expiration": int((time.time() + 1800) * 1000),
                      "golem.node.debug.subnet": self.subnet,
                      "golem.com.payment.chosen-platform": self.stack.platform,
                      **{p["key"]: p["value"] for p in decorations["properties"]}}
        constraints = ["(golem.runtime.name=vm)", f"(golem.node.debug.subnet={self.subnet})",
                       *decorations["constraints"]]
        demand = {"properties": properties, "constraints": "(&" + "".join(constraints) + ")"}
        self.demand_id = self.call("POST", "/market-api/v1/demands", json=demand)
        events = f"/market-api/v1/demands/{self.demand_id}/events"

        def proposal(state: str) -> dict[str, Any] | None:
            for event in self.events(events):
                p = event.get("proposal") or {}
                if event["eventType"] == "ProposalEvent" and p.get("state") == state:
                    assert p["issuerId"].lower() == provider_id.lower(), p["issuerId"]
                    return p
            return None

        offer = self.wait("offer from the provider", lambda: proposal("Initial"))
        self.call("POST", f"{events.removesuffix('/events')}/proposals/{offer['proposalId']}", json=demand)
        draft = self.wait("draft from the provider", lambda: proposal("Draft"))
        agreement_id = self.call("POST", "/market-api/v1/agreements", json={
            "proposalId": draft["proposalId"], "validTo": iso(datetime.now(UTC) + timedelta(minutes=30))})
        self.call("POST", f"/market-api/v1/agreements/{agreement_id}/confirm")
        self.call("POST", f"/market-api/v1/agreements/{agreement_id}/wait", params={"timeout": 15}, expect=(204,))
        return agreement_id

    def create_activity(self, agreement_id: str) -> str:
        created = self.call("POST", "/activity-api/v1/activity", json={"agreementId": agreement_id},
                            params={"timeout": 30})
        return created if isinstance(created, str) else created["activityId"]

    def exec(self, activity_id: str, script: list[dict[str, Any]]) -> str:
        return self.call("POST", f"/activity-api/v1/activity/{activity_id}/exec", json={"text": json.dumps(script)})

    def results(self, activity_id: str, batch_id: str, timeout_s: float = 2) -> list[dict[str, Any]]:
        return self.call("GET", f"/activity-api/v1/activity/{activity_id}/exec/{batch_id}",
                         params={"timeout": timeout_s}) or []

    def finished(self, activity_id: str, batch_id: str, timeout_s: float = 30) -> list[dict[str, Any]]:
        def done() -> list[dict[str, Any]] | None:
            results = self.results(activity_id, batch_id)
            return results if results and results[-1]["isBatchFinished"] else None

        return self.wait(f"end of batch {batch_id}", done, timeout_s)

    def agreement(self, agreement_id: str) -> dict[str, Any]:
        return self.call("GET", f"/market-api/v1/agreements/{agreement_id}")

    def close(self) -> None:
        if self.demand_id:
            self.call("DELETE", f"/market-api/v1/demands/{self.demand_id}", expect=(200, 204, 404, 410))
        if self.allocation_id:
            self.call("DELETE", f"/payment-api/v1/allocations/{self.allocation_id}", expect=(200, 204, 404, 410))
        self.session.close()


@pytest.fixture
def requestor(stack: Any, subnet: str):
    r = Requestor(stack, subnet)
    yield r
    r.close()


class Phases:
    """Wall time of each step, logged: how long each exchange with the daemon takes."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.times: list[tuple[str, float]] = []

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.times.append((name, now - self.t))
        logger.info("%-40s %.2f s", name, now - self.t)
        self.t = now


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def process_tree(pids: list[int]) -> list[int] | None:
    """``pids`` and their descendants, once every one of them has some."""
    tree = []
    for pid in pids:
        children = psutil.Process(pid).children(recursive=True)
        if not children:
            return None
        tree += [pid, *(c.pid for c in children)]
    return tree or None


def test_a_requestor_rents_runs_and_pays(stack: Any, provider: YagnaTestProvider, requestor: Requestor) -> None:
    phase = Phases()
    agreement_id = requestor.rent(stack.provider_id)
    phase("negotiation + agreement approved")
    # the requestor's wait may return before the provider's approve call does
    provider.wait_for(lambda: provider.agreements[agreement_id]["state"] == "Approved", 5, "approval")
    signed = requestor.agreement(agreement_id)["offer"]["properties"]
    pricing = LinearPricing.from_properties(signed)
    assert pricing == provider.pricing == LinearPricing(Decimal("0.002"), Decimal("0.001"), Decimal("0.0001"))

    activity_id = requestor.create_activity(agreement_id)
    phase("activity created")
    assert provider.activities[activity_id]["state"] == "Initialized"
    assert provider.open_services() == 1

    batch = requestor.exec(activity_id, [
        {"deploy": {}}, {"start": {}},
        {"run": {"entry_point": "/bin/sh", "args": ["-c", "echo hi > /golem/out.txt; cat /golem/out.txt"]}}])
    results = requestor.finished(activity_id, batch)
    phase("deploy, start, run")
    assert [r["result"] for r in results] == ["Ok", "Ok", "Ok"], results
    assert [r["isBatchFinished"] for r in results] == [False, False, True]
    assert results[2]["stdout"] == "hi\n"
    assert (provider.sandbox(activity_id) / "out.txt").read_text() == "hi\n"
    state = requestor.call("GET", f"/activity-api/v1/activity/{activity_id}/state")["state"]
    assert state[0] == "Ready", state

    batch = requestor.exec(activity_id, [
        {"run": {"entry_point": "/usr/bin/env", "args": ["python3", "-c", "import time; time.sleep(30)"]}}])
    pid = requestor.wait("the sleeper", lambda: provider.activities[activity_id]["running"])[0]
    requestor.wait("python3 run by /usr/bin/env", lambda: psutil.Process(pid).cmdline()[-2:] == [
        "-c", "import time; time.sleep(30)"] and "python" in psutil.Process(pid).name(), 5)
    assert requestor.results(activity_id, batch, timeout_s=1.5) == []  # still running
    note = provider.wait_for(lambda: [d for d in provider.debit_notes if d["status"]], 10, "debit note")[0]
    seen = requestor.wait("the debit note at the requestor", lambda: requestor.call(
        "GET", f"/payment-api/v1/debitNotes/{note['id']}", expect=(200, 404)))
    usage = dict(zip(signed["golem.com.usage.vector"], seen["usageCounterVector"]))
    assert Decimal(seen["totalAmountDue"]) == pricing.cost({k: Decimal(str(v)) for k, v in usage.items()}) > 0
    assert seen["activityId"] == activity_id
    phase("long run seen unfinished, a debit note")

    requestor.call("DELETE", f"/activity-api/v1/activity/{activity_id}")
    phase("activity destroyed")
    provider.wait_for(lambda: gone(pid), 5, f"end of process {pid}")
    requestor.call("POST", f"/market-api/v1/agreements/{agreement_id}/terminate", json={"message": "done"})
    invoice = provider.wait_for(lambda: provider.invoices, 15, "invoice")[0]
    phase("agreement terminated, invoice issued")
    assert provider.activities[activity_id]["state"] == "Terminated"
    assert provider.open_services() == 0
    final = invoice["usage"][activity_id]
    assert invoice["amount"] == pricing.cost(usage_counters(*final))
    notes = [d for d in provider.debit_notes if d["activity_id"] == activity_id]
    assert notes[-1]["usage"] == final, "the last debit note carries the usage invoiced"
    assert final[0] >= 1.0 and final[1] >= 0

    received = requestor.wait("the invoice at the requestor", lambda: requestor.call(
        "GET", f"/payment-api/v1/invoices/{invoice['id']}", expect=(200, 404)))
    assert Decimal(received["amount"]) == invoice["amount"]
    assert received["agreementId"] == agreement_id and received["activityIds"] == [activity_id]
    balance = stack.token_balance(stack.provider_id)
    requestor.call("POST", f"/payment-api/v1/invoices/{invoice['id']}/accept",
                   json={"totalAmountAccepted": received["amount"], "allocationId": requestor.allocation_id})
    requestor.call("POST", f"/payment-api/v1/batchCycle/{stack.platform}/now")
    provider.wait_for(lambda: [i for i in provider.invoices if i["status"] == "SETTLED"], 30, "settled invoice")
    phase("invoice accepted and settled")
    assert stack.token_balance(stack.provider_id) - balance >= int(invoice["amount"] * 10**18)
    assert len(provider.invoices) == 1 and not provider.billing_failures


class _Files(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"input data\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_commands_fail_like_a_vms_and_close_releases_everything(
        stack: Any, provider: YagnaTestProvider, requestor: Requestor) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/input.txt"
    try:
        agreement_id = requestor.rent(stack.provider_id)
        activity_id = requestor.create_activity(agreement_id)

        batch = requestor.exec(activity_id, [{"run": {"entry_point": "/bin/true", "args": []}}])
        [refused] = requestor.finished(activity_id, batch)
        assert refused["result"] == "Error" and "deploy and start first" in refused["message"]

        batch = requestor.exec(activity_id, [
            {"deploy": {}}, {"start": {}},
            {"transfer": {"from": url, "to": "container:/golem/input/data.txt"}},
            {"transfer": {"from": "container:/golem/input/data.txt", "to": "container:/golem/copy.txt"}},
            {"run": {"entry_point": "/bin/sh", "args": ["-c", "cat /golem/copy.txt; echo boom >&2; exit 3"]}},
            {"run": {"entry_point": "/bin/true", "args": []}}])
        results = requestor.finished(activity_id, batch)
        assert [r["result"] for r in results] == ["Ok", "Ok", "Ok", "Ok", "Error"], results
        assert results[-1]["isBatchFinished"], "a failing command ends its batch"
        assert "exited with code 3" in results[-1]["message"] and "boom" in results[-1]["message"]
        assert (provider.sandbox(activity_id) / "copy.txt").read_text() == "input data\n"

        batch = requestor.exec(activity_id, [
            {"transfer": {"from": "container:/golem/../../../etc/passwd", "to": "container:/golem/x"}}])
        [escape] = requestor.finished(activity_id, batch)
        assert escape["result"] == "Error" and "leaves the container" in escape["message"]

        requestor.exec(activity_id, [{"run": {"entry_point": "/bin/sh", "args": ["-c", "sleep 60 & sleep 60"]}}])
        tree = requestor.wait("the sleepers", lambda: process_tree(provider.activities[activity_id]["running"]))
        pids = provider.pids(activity_id)
        offer_id = provider.offer_id
        provider.close()  # the fixture then checks that no connection to the daemon is left
        provider.close()  # twice is fine

        assert all(gone(pid) for pid in [*pids, *tree]), [p for p in [*pids, *tree] if not gone(p)]
        assert provider.open_services() == 0
        [invoice] = provider.invoices
        assert invoice["agreement_id"] == agreement_id and invoice["amount"] > 0
        assert provider.agreements[agreement_id]["terminator"] == "Provider"

        assert requestor.agreement(agreement_id)["state"] == "Terminated"
        with requests.Session() as s:
            s.trust_env = False
            offers = s.get(stack.api_url.rstrip("/") + "/market-api/v1/offers",
                           headers={"Authorization": f"Bearer {stack.provider_key}"}, timeout=30).json()
        assert offer_id not in {o["offerId"] for o in offers}
        requestor.wait("the invoice at the requestor", lambda: requestor.call(
            "GET", f"/payment-api/v1/invoices/{invoice['id']}", expect=(200, 404)))
    finally:
        server.shutdown()


def test_golem_paths_map_into_the_sandbox(tmp_path: Path) -> None:
    sandbox = Sandbox(tmp_path / "act")
    golem = str(sandbox.golem)
    assert sandbox.rewrite("echo hi > /golem/out.txt; cat /golem/out.txt") == \
        f"echo hi > {golem}/out.txt; cat {golem}/out.txt"
    assert sandbox.rewrite("--local-directory=/golem") == f"--local-directory={golem}"
    assert sandbox.rewrite("/golemx /x/golem/y ./golem/z") == "/golemx /x/golem/y ./golem/z"
    assert sandbox.path("container:/golem/in/a.txt") == (sandbox.golem / "in" / "a.txt").resolve()
    assert sandbox.path("/tmp/b") == (sandbox.root / "tmp" / "b").resolve()
    with pytest.raises(Exception, match="leaves the container"):
        sandbox.path("/golem/../../outside")
    with pytest.raises(Exception, match="not absolute"):
        sandbox.path("container:golem/x")
