"""Workers through a real yagna daemon: golem-dask against the bare REST sequence.

An offline stack (the tests' :mod:`yagna_stack`: anvil, one daemon on a central net of its
own) and one provider (:mod:`yagna_provider`: a second identity playing the provider over
REST, its exe-unit served through the daemon's GSB API, really starting ``dask worker``).
Each round, in alternating order:

* golem-dask: ``GolemCluster(market="yagna", n_workers=2)`` until both workers are
  registered (TLS, per-worker certificates, the accountant and payer running), then
  ``close()`` with settlement: activities destroyed, agreements terminated, invoices
  checked and accepted, the daemon's payment cycle run, the payments confirmed on anvil;
* bare: the same REST calls made without golem-dask (allocation, decorated demand, for each
  worker concurrently a counter-proposal, an agreement confirmed and approved, an activity,
  ``deploy``/``start``/``run dask worker``), a plain scheduler in this process, until both
  workers are registered; then, timed apart, the bare close with settlement: workers
  retired, activities destroyed, agreements terminated, each invoice accepted as it arrives, the payment cycle
  run, the payments polled until both are reported.

Prints the geometric mean of the per-round ratios golem/bare for the time to two workers
(with a bootstrap 95% interval), and the median close-with-settlement time of both.

    python benchmarks/bench_yagna.py [--rounds 5]

Targets: time to 2 workers golem/bare <= 1.2; close with settlement < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from _common import bootstrap_interval, finish, geometric_mean, log, median, quiet_logs, report_targets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

IMAGE = "hash:sha3:" + hashlib.sha3_224(b"bench").hexdigest() + ":http://127.0.0.1:1/worker.gvmi"
TARGET_START, TARGET_CLOSE = 1.2, 2.0


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def bare(stack: Any, subnet: str, n: int) -> tuple[float, float]:
    """Seconds from nothing to ``n`` dask workers registered over plain REST calls, and
    seconds to close them with settlement."""
    import aiohttp
    from distributed import Scheduler

    started = time.perf_counter()
    base = stack.api_url
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {stack.requestor_key}"}) as http:

        async def call(method: str, path: str, **kw: Any) -> Any:
            async with http.request(method, base + path, **kw) as r:
                assert r.status < 300, (method, path, r.status, await r.text())
                text = await r.text()
                return json.loads(text) if text else None

        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as scheduler:
            alloc = await call("POST", "/payment-api/v1/allocations", json={
                "totalAmount": "1", "paymentPlatform": stack.platform,
                "timeout": iso(datetime.now(UTC) + timedelta(hours=1))})
            dec = await call("GET", "/payment-api/v1/demandDecorations", params={"allocationIds": alloc["allocationId"]})
            props = {"golem.srv.comp.expiration": int((time.time() + 600) * 1000), "golem.node.debug.subnet": subnet,
                     "golem.com.payment.chosen-platform": stack.platform, "golem.inf.cpu.threads": 1,
                     "golem.srv.comp.task_package": IMAGE, **{p["key"]: p["value"] for p in dec["properties"]}}
            demand = {"properties": props, "constraints": "(&(golem.runtime.name=vm)"
                      f"(golem.node.debug.subnet={subnet})" + "".join(dec["constraints"]) + ")"}
            did = await call("POST", "/market-api/v1/demands", json=demand)
            events: list[dict[str, Any]] = []
            while not events:
                events = [e for e in await call("GET", f"/market-api/v1/demands/{did}/events",
                                                params={"timeout": "5", "maxEvents": "10"})
                          if e["eventType"] == "ProposalEvent"]
            latest = events[0]["proposal"]["proposalId"]
            lock = asyncio.Lock()
            activities: list[str] = []
            agreements: list[str] = []

            async def worker(i: int) -> None:
                nonlocal latest
                async with lock:  # one negotiation at a time per offer, as the daemon needs
                    ours = await call("POST", f"/market-api/v1/demands/{did}/proposals/{latest}", json=demand)
                    draft = None
                    while draft is None:
                        for e in await call("GET", f"/market-api/v1/demands/{did}/events",
                                            params={"timeout": "5", "maxEvents": "10"}):
                            if e.get("proposal", {}).get("prevProposalId") == ours:
                                draft = e["proposal"]["proposalId"]
                    latest = draft
                    agreement = await call("POST", "/market-api/v1/agreements", json={
                        "proposalId": draft, "validTo": iso(datetime.now(UTC) + timedelta(minutes=10))})
                    await call("POST", f"/market-api/v1/agreements/{agreement}/confirm")
                    await call("POST", f"/market-api/v1/agreements/{agreement}/wait", params={"timeout": "10"})
                    agreements.append(agreement)
                made = await call("POST", "/activity-api/v1/activity", json={"agreementId": agreement},
                                  params={"timeout": "30"})
                activity = made["activityId"] if isinstance(made, dict) else made
                activities.append(activity)
                script = [{"deploy": {}}, {"start": {}}, {"run": {"entry_point": "/usr/bin/env", "args": [
                    "dask", "worker", scheduler.address, "--name", f"bare-{i}", "--no-nanny", "--no-dashboard"]}}]
                await call("POST", f"/activity-api/v1/activity/{activity}/exec", json={"text": json.dumps(script)})

            await asyncio.gather(*(worker(i) for i in range(n)))
            while len(scheduler.workers) < n:
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
            closing = time.perf_counter()
            since = iso(datetime.now(UTC) - timedelta(seconds=1))
            await scheduler.retire_workers(close_workers=True)  # as the cluster does: workers first
            ended = asyncio.gather(  # as golem-dask does: the daemon answers a destroy only when the unit did
                *(call("DELETE", f"/activity-api/v1/activity/{activity}") for activity in activities),
                *(call("POST", f"/market-api/v1/agreements/{agreement}/terminate", json={"message": "done"})
                  for agreement in agreements))
            owed: dict[str, str] = {}
            after = since
            while len(owed) < len(agreements):
                for e in await call("GET", "/payment-api/v1/invoiceEvents",
                                    params={"afterTimestamp": after, "timeout": "5", "maxEvents": "10"}):
                    after = e["eventDate"]
                    if e["eventType"] != "InvoiceReceivedEvent":
                        continue
                    invoice = await call("GET", f"/payment-api/v1/invoices/{e['invoiceId']}")
                    if invoice["agreementId"] in agreements and invoice["agreementId"] not in owed:
                        owed[invoice["agreementId"]] = invoice["amount"]
                        await call("POST", f"/payment-api/v1/invoices/{e['invoiceId']}/accept", json={
                            "totalAmountAccepted": invoice["amount"], "allocationId": alloc["allocationId"]})
            await call("POST", f"/payment-api/v1/batchCycle/{stack.platform}/now")
            paid: set[str] = set()
            while len(paid) < len(agreements):
                await asyncio.sleep(0.05)
                for payment in await call("GET", "/payment-api/v1/payments", params={"afterTimestamp": since}):
                    paid |= {p["agreementId"] for p in payment.get("agreementPayments") or ()} & set(agreements)
            down = time.perf_counter() - closing
            await ended
            await call("DELETE", f"/market-api/v1/demands/{did}")
            await call("DELETE", f"/payment-api/v1/allocations/{alloc['allocationId']}")
    return elapsed, down


def golem(n: int) -> tuple[float, float]:
    """Seconds to ``n`` registered workers with GolemCluster, and to close with settlement."""
    from golem_dask import GolemCluster

    started = time.perf_counter()
    cluster = GolemCluster(n_workers=n, market="yagna", budget="1", cpu=1, memory="1GiB")
    up = time.perf_counter() - started
    started = time.perf_counter()
    cluster.close()
    down = time.perf_counter() - started
    statuses = [e.status for e in cluster.bill().entries]
    assert statuses == ["paid"] * n, cluster.bill()
    return up, down


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", help="write the figures and targets here")
    args = parser.parse_args()
    quiet_logs("aiohttp")

    import dask
    from yagna_provider import YagnaTestProvider
    from yagna_stack import YagnaStack, subnet

    ratios, closes, bare_closes, rows = [], [], [], []
    with YagnaStack() as stack, tempfile.TemporaryDirectory(prefix="bench-yagna-") as tmp:
        name = subnet()
        os.environ.update(YAGNA_API_URL=stack.api_url, YAGNA_APPKEY=stack.requestor_key)
        provider = YagnaTestProvider(stack.api_url, stack.provider_key, stack.provider_id, stack.platform, name,
                                     threads=4, debit_note_interval_s=5, workdir=Path(tmp) / "provider",
                                     price_per_second=Decimal("0.0001"), price_per_cpu_second=Decimal("0.0002"))
        config = {"golem.yagna.subnet": name, "golem.yagna.collection-window": 0, "golem.yagna.image": IMAGE,
                  "golem.market.agreement-lifetime": "10m", "golem.yagna.connectivity": "direct"}
        with provider, dask.config.set(config):
            golem(args.workers)  # warm-up: imports, the first TLS material
            for i in range(args.rounds):
                if i % 2:
                    b, b_down = asyncio.run(bare(stack, name, args.workers))
                    up, down = golem(args.workers)
                else:
                    up, down = golem(args.workers)
                    b, b_down = asyncio.run(bare(stack, name, args.workers))
                ratios.append(up / b)
                closes.append(down)
                bare_closes.append(b_down)
                rows.append((up, b, down, b_down))
                log(f"round {i}: golem {up:.3f} s, bare {b:.3f} s, ratio {up / b:.3f}; close with settlement "
                    f"golem {down:.3f} s, bare {b_down:.3f} s")
    low, high = bootstrap_interval(ratios)
    log(f"\ntime to {args.workers} workers golem/bare: {geometric_mean(ratios):.3f} [{low:.3f}-{high:.3f}] "
        f"(golem median {median([r[0] for r in rows]):.3f} s, bare {median([r[1] for r in rows]):.3f} s)")
    log(f"close with settlement: median golem {median(closes):.3f} s, bare {median(bare_closes):.3f} s")
    targets = [
        {"name": f"time to {args.workers} workers golem/bare <= {TARGET_START}", "value": geometric_mean(ratios),
         "pass": geometric_mean(ratios) <= TARGET_START},
        {"name": f"close with settlement < {TARGET_CLOSE} s", "value": median(closes),
         "pass": median(closes) < TARGET_CLOSE},
    ]
    report_targets(targets)
    return finish(args.json, targets, rounds=rows, ratio=geometric_mean(ratios), interval=[low, high],
                  close_s=median(closes), bare_close_s=median(bare_closes))


if __name__ == "__main__":
    sys.exit(main())
