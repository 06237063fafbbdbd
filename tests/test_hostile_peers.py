"""Strangers attack each other through a real hub; each attack is refused with its reason.

A hostile requestor is this test speaking the protocol directly (a signed hub link, as
any stranger can) to a real ``golem-dask provider`` daemon; a hostile provider is a real
daemon process whose agent misbehaves, against a real requestor (a GolemCluster).
Nothing is written where it must not be, nothing is paid wrongly.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import sqlite3
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from anvil_support import anvil  # noqa: F401
from fleet_support import fleet, requestor, wait_until
from golem_dask import GolemCluster
from golem_dask.chain.units import to_wei
from golem_dask.market.demand import DemandSpec
from golem_dask.market.link import HubLink
from golem_dask.market.matching import offer_proposal
from golem_dask.protocol import properties as P
from golem_dask.protocol import terms, wire
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.messages import Agreement, ExeCommand, Offer, Payment, Proposal, new_id, now_ms
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.protocol.sealing import activity_aad, provider_key, seal_commands
from test_payment_durability import balance

pytestmark = pytest.mark.e2e


class RawRequestor:
    """A requestor speaking the hub protocol itself: whatever a stranger could send."""

    def __init__(self, url: str, wallet: Wallet | None = None) -> None:
        self.wallet = wallet or Wallet.generate()
        self.link = HubLink(url, self.wallet, "requestor", self._on_message)
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.offers: asyncio.Queue[Offer] = asyncio.Queue()

    async def _on_message(self, envelope: wire.Envelope, payload: Any) -> None:
        if envelope.kind == "reply" and str(payload.get("call_id")) in self.replies:
            self.replies.pop(str(payload["call_id"])).set_result(payload)
        elif envelope.kind == "event" and isinstance(payload, dict):
            for frame in payload.get("offers") or ([payload["offer"]] if "offer" in payload else []):
                self.offers.put_nowait(wire.verify(wire.unframe(frame)))

    async def __aenter__(self) -> RawRequestor:
        await self.link.start(10)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.link.close()

    async def call(self, provider: str, method: str, *args: Any) -> dict[str, Any]:
        call_id = new_id()
        self.replies[call_id] = asyncio.get_running_loop().create_future()
        await self.link.send("call", {"to": provider, "call_id": call_id, "method": method, "args": list(args)})
        return await asyncio.wait_for(self.replies[call_id], 30)

    def demand(self, **props: Any):  # type: ignore[no-untyped-def]
        spec = DemandSpec.from_kwargs(cpu=1, memory="1GiB", storage="1GiB")
        demand = spec.build(self.wallet.address, now_ms())
        return dataclasses.replace(demand, properties={**demand.properties, **props})

    async def agreement(self, **demand_props: Any) -> Agreement:
        """An honest, signed agreement over the first offer's real reply."""
        demand = self.demand(**demand_props)
        await self.link.send("subscribe", {"sub": new_id(), "demand": demand})
        offer = await asyncio.wait_for(self.offers.get(), 30)
        counter = dataclasses.replace(offer_proposal(offer, demand), issuer="requestor",
                                      properties=demand.properties, constraints=demand.constraints,
                                      prev_proposal_id=offer.id, id=new_id())
        reply = await self.call(offer.provider_id, "on_proposal", counter)
        assert reply["ok"], reply
        theirs: Proposal = reply["value"]
        return terms.sign(Agreement(new_id(), counter, theirs, self.wallet.address, offer.provider_id,
                                    int(demand.properties[P.EXPIRATION])), self.wallet)


#: Room for several agreements at once on one provider.
BIG = ("--cpu", "16", "--memory", "32GiB")


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 120))


# -- a hostile requestor against a real provider daemon ---------------------------------------------


def test_a_requestor_cannot_change_or_borrow_the_terms(anvil, tmp_path):  # noqa: F811
    with fleet(anvil, tmp_path, {}) as f:
        provider = f.start_provider("p", "0.1", extra=BIG)

        async def main() -> dict[str, str]:
            errors = {}
            async with RawRequestor(f.url) as mallory, RawRequestor(f.url) as alice:
                honest = await alice.agreement()
                assert (await alice.call(provider, "approve", honest))["ok"]
                agreement = await mallory.agreement()
                cheap = LinearPricing.per_hour(Decimal("0.0001"), Decimal(0)).to_properties()
                attacks = {
                    "cheaper offer": dataclasses.replace(agreement, offer=dataclasses.replace(
                        agreement.offer, properties={**agreement.offer.properties, **cheap})),
                    "negative threads": dataclasses.replace(agreement, demand=dataclasses.replace(
                        agreement.demand, properties={**agreement.demand.properties, P.CPU_THREADS: -8})),
                    "alice's agreement id": dataclasses.replace(agreement, id=honest.id),
                }
                for name, forged in attacks.items():
                    reply = await mallory.call(provider, "approve", terms.sign(forged, mallory.wallet))
                    assert not reply["ok"], name
                    errors[name] = reply["error"]
                # Nor can mallory drive alice's agreement or activity.
                activity = (await alice.call(provider, "create_activity", honest.id))["value"]
                for method, args in (("create_activity", [honest.id]), ("terminate", [honest.id, "mine now"]),
                                     ("exec", [activity.id, [ExeCommand("deploy")]]),
                                     ("destroy_activity", [activity.id])):
                    reply = await mallory.call(provider, method, *args)
                    assert not reply["ok"], method
                    errors[method] = reply["error"]
                negative = await mallory.call(provider, "on_proposal", dataclasses.replace(
                    agreement.demand, id=new_id(), properties={**agreement.demand.properties, P.CPU_THREADS: -8}))
                errors["negative counter"] = negative["error"]
                assert (await alice.call(provider, "terminate", honest.id, "done"))["ok"]
            return errors

        errors = run(main())
    assert "is not a proposal provider p made" in errors["cheaper offer"]
    assert "is not the counter-proposal this provider answered" in errors["negative threads"]
    assert "was used before" in errors["alice's agreement id"]
    for method in ("create_activity", "terminate", "exec", "destroy_activity"):
        assert "is not" in errors[method] and "agreement" in errors[method], errors[method]
    assert "threads and memory must be positive" in errors["negative counter"]


SECRET = "the provider's own secret"


def test_a_requestor_cannot_read_or_write_the_providers_files(anvil, tmp_path):  # noqa: F811
    private = tmp_path / "provider-private.txt"
    private.write_text(SECRET)
    target = tmp_path / "written-by-requestor.txt"
    with fleet(anvil, tmp_path, {}) as f:
        provider = f.start_provider("p", "0.1", extra=BIG)

        async def main() -> dict[str, str]:
            errors = {}
            async with RawRequestor(f.url) as mallory:
                agreement = await mallory.agreement()
                approved = (await mallory.call(provider, "approve", agreement))["value"]
                key = provider_key(approved)
                attacks = {
                    "read a host file": {"from": private.as_uri(), "to": "/golem/input/stolen.txt"},
                    "cloud metadata": {"from": "http://169.254.169.254/latest/meta-data/", "to": "/golem/input/m"},
                    "loopback service": {"from": "http://127.0.0.1:22/", "to": "/golem/input/ssh"},
                    "write a host file": {"from": "/golem/output/x", "to": target.as_uri()},
                    "chained url": {"from": f"simplecache::{private.as_uri()}", "to": "/golem/input/stolen2.txt"},
                    # The hub relays the error in clear: a signed URL's signature must not be in it.
                    "signed url": {"from": "http://127.0.0.1:9/k?X-Amz-Signature=SIGNED-SECRET", "to": "/golem/input/k"},
                    "signed ftp url": {"from": "ftp://u:SIGNED-SECRET@example.org/k?sig=SIGNED-SECRET",
                                       "to": "/golem/input/k"},
                }
                for name, args in attacks.items():
                    activity = (await mallory.call(provider, "create_activity", approved.id))
                    if not activity["ok"]:  # one activity per agreement: a fresh agreement per attack
                        approved = (await mallory.call(provider, "approve", await mallory.agreement()))["value"]
                        activity = await mallory.call(provider, "create_activity", approved.id)
                    act = activity["value"]
                    script = seal_commands([ExeCommand("deploy"), ExeCommand("start"), ExeCommand("transfer", args)],
                                           key, activity_aad(approved.id, act.id))
                    reply = await mallory.call(provider, "exec", act.id, script)
                    assert not reply["ok"], name
                    errors[name] = reply["error"]
                    approved = (await mallory.call(provider, "approve", await mallory.agreement()))["value"]
                # A transfer in clear is refused before any policy: secrets never travel so.
                act = (await mallory.call(provider, "create_activity", approved.id))["value"]
                reply = await mallory.call(provider, "exec", act.id, [ExeCommand("deploy"), ExeCommand("start"),
                                                                      ExeCommand("transfer", {"from": "data:,x",
                                                                                              "to": "/golem/x"})])
                errors["in clear"] = reply["error"]
            return errors

        errors = run(main())
    for name in ("read a host file", "write a host file"):
        assert "transfer refused" in errors[name] and "its own files" in errors[name], (name, errors[name])
    assert "scheme 'simplecache' is not allowed" in errors["chained url"]
    for name in ("cloud metadata", "loopback service"):
        assert "transfer refused" in errors[name] and "address" in errors[name], (name, errors[name])
    assert "must be sealed" in errors["in clear"]
    assert SECRET not in " ".join(errors.values())
    assert "SIGNED-SECRET" not in " ".join(errors.values()), errors
    assert not target.exists()
    assert not list(tmp_path.glob("**/stolen*"))


def test_a_requestor_cannot_announce_one_transfer_for_two_invoices(anvil, tmp_path):  # noqa: F811
    from golem_dask.payment.ethereum import EthereumPayer

    with fleet(anvil, tmp_path, {}) as f:
        provider = f.start_provider("p", "0.1", extra=(*BIG, "--start-price", "0.01"))
        key = os.urandom(32).hex()
        mallory_wallet = Wallet.from_key(key)
        from golem_dask.chain.deploy import fund

        fund(anvil.web3(), anvil.contracts["token"], anvil.accounts[0], mallory_wallet.address, Decimal(1), 10**18)

        async def main() -> tuple[str, str, str]:
            async with RawRequestor(f.url, mallory_wallet) as mallory:
                ids = []
                for _ in range(2):
                    agreement = await mallory.agreement()
                    assert (await mallory.call(provider, "approve", agreement))["ok"]
                    # Never run: the invoice is the start price, 0.01.
                    assert (await mallory.call(provider, "terminate", agreement.id, "done"))["ok"]
                    ids.append(agreement.id)
                payer = EthereumPayer(anvil.web3(), wallet=mallory_wallet, token_address=anvil.contracts["token"])
                paid = await payer.pay(provider, Decimal("0.01"), reference="first")
                for agreement_id, claimed in ((ids[0], "0.01"), (ids[1], "0.01"), (ids[1], "5")):
                    payment = Payment(mallory_wallet.address, provider, Decimal(claimed), "erc20-devnet-glm", (),
                                      paid.tx_hash, agreement_ids=(agreement_id,))
                    assert (await mallory.call(provider, "on_payment", payment))["ok"]
                return ids[0], ids[1], paid.tx_hash

        first, second, tx = run(main())
        wait_until(lambda: "NOT credited" in f.log("p") and "paid in full" in f.log("p"), 30, "the provider's checks")
        db = sqlite3.connect(next((tmp_path / "p").glob("receivables-*.sqlite")))
        status = dict(db.execute("SELECT agreement_id, status FROM invoices").fetchall())
        credited = db.execute("SELECT SUM(CAST(amount_wei AS INTEGER)) FROM credits").fetchone()[0]
    assert status == {first: "paid", second: "unpaid"}  # one transfer, one invoice
    assert credited == to_wei(Decimal("0.01"))
    assert f"payment verified: 0.01 GLM in {tx}" in f.log("p")
    assert balance(anvil, provider) == Decimal("0.01")


def test_only_its_requestor_accepts_rejects_or_announces_payment_and_a_partial_acceptance_is_what_is_due(
        anvil, tmp_path):  # noqa: F811
    from golem_dask.chain.deploy import fund
    from golem_dask.payment.ethereum import EthereumPayer

    with fleet(anvil, tmp_path, {}) as f:
        provider = f.start_provider("p", "0.1", extra=(*BIG, "--start-price", "0.01"))
        alice_wallet = Wallet.generate()
        fund(anvil.web3(), anvil.contracts["token"], anvil.accounts[0], alice_wallet.address, Decimal(1), 10**18)

        def invoice_row(agreement_id: str) -> tuple[str, str, str] | None:
            found = list((tmp_path / "p").glob("receivables-*.sqlite"))
            if not found:
                return None
            with sqlite3.connect(found[0]) as db:
                return db.execute("SELECT id, status, amount_wei FROM invoices WHERE agreement_id = ?",
                                  (agreement_id,)).fetchone()

        async def main() -> tuple[str, dict[str, str]]:
            async with RawRequestor(f.url, alice_wallet) as alice, RawRequestor(f.url) as mallory:
                agreement = await alice.agreement()
                assert (await alice.call(provider, "approve", agreement))["ok"]
                assert (await alice.call(provider, "terminate", agreement.id, "done"))["ok"]  # invoice: 0.01
                for _ in range(300):
                    if invoice_row(agreement.id):
                        break
                    await asyncio.sleep(0.1)
                invoice_id = invoice_row(agreement.id)[0]
                errors = {}
                for method, args in (("on_accepted", [invoice_id, Decimal(0)]), ("on_rejected", [invoice_id, "no"])):
                    reply = await mallory.call(provider, method, *args)
                    assert not reply["ok"], method
                    errors[method] = reply["error"]
                assert (await alice.call(provider, "on_accepted", invoice_id, Decimal("0.004")))["ok"]
                payer = EthereumPayer(anvil.web3(), wallet=alice_wallet, token_address=anvil.contracts["token"])
                paid = await payer.pay(provider, Decimal("0.004"), reference="the accepted share")
                # Mallory saw alice's transfer on chain: announcing it for alice's agreement, or for
                # nothing, is refused; for an agreement of its own it credits nothing (mallory paid
                # nothing in it) and leaves the hash free for alice.
                own = await mallory.agreement()
                assert (await mallory.call(provider, "approve", own))["ok"]
                for name, named in (("alice's", dict(agreement_ids=(agreement.id,))), ("nothing", {}),
                                    ("its own", dict(agreement_ids=(own.id,)))):
                    squat = Payment(mallory.wallet.address, provider, Decimal("0.004"), "erc20-devnet-glm", (),
                                    paid.tx_hash, **named)
                    reply = await mallory.call(provider, "on_payment", squat)
                    errors[f"on_payment for {name}"] = "" if reply["ok"] else reply["error"]
                payment = Payment(alice_wallet.address, provider, Decimal("0.004"), "erc20-devnet-glm", (invoice_id,),
                                  paid.tx_hash, agreement_ids=(agreement.id,))
                assert (await alice.call(provider, "on_payment", payment))["ok"]
                return agreement.id, errors

        agreement_id, errors = run(main())
        wait_until(lambda: invoice_row(agreement_id)[1] == "paid", 30, "the accepted share to settle the invoice")
    for method in ("on_accepted", "on_rejected", "on_payment for alice's", "on_payment for nothing"):
        assert "is not" in errors[method], errors[method]
    assert errors["on_payment for its own"] == ""
    assert invoice_row(agreement_id)[2] == str(to_wei(Decimal("0.004")))  # what was due, after alice's acceptance


def test_a_task_does_not_see_the_providers_key(anvil, tmp_path):  # noqa: F811
    with fleet(anvil, tmp_path, {}) as f, requestor(anvil, tmp_path):
        f.start_provider("p", "0.1")
        with GolemCluster(n_workers=1, market=f.url, budget="2") as cluster, Client(cluster) as client:
            seen = client.submit(lambda: sorted(k for k in __import__("os").environ
                                                if k.startswith(("GOLEM_DASK", "DASK_GOLEM")))).result()
            assert client.submit(lambda: 6 * 7).result() == 42
    assert seen == []


# -- a hostile provider against a real requestor ------------------------------------------------------

HOSTILE = """
import asyncio, dataclasses, os, sys
from decimal import Decimal
from golem_dask import config
from golem_dask.protocol import properties as P, terms
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.provider.agent import ProviderAgent
from golem_dask.provider.daemon import ProviderDaemon
from golem_dask.provider.factory import make_runtime, provider_settings
from golem_dask.provider.runtime.policy import TransferPolicy

class Hostile(ProviderAgent):
    async def approve(self, agreement):
        approved = await super().approve(agreement)
        if sys.argv[2] != "raise-prices":
            return approved
        pricing = LinearPricing.from_properties(approved.offer.properties)
        raised = LinearPricing(pricing.price_per_cpu_second * 100, pricing.price_per_second * 100)
        offer = dataclasses.replace(approved.offer, properties={**approved.offer.properties, **raised.to_properties()})
        return terms.sign(dataclasses.replace(approved, offer=offer), self.wallet)

    def invoice_usage(self, deal):
        usage = dict(super().invoice_usage(deal))
        if sys.argv[2] == "inflate":
            usage[P.USAGE_CPU_SEC] = usage[P.USAGE_CPU_SEC] * 10 + 50
        return usage

wallet = Wallet.from_env("GOLEM_DASK_PROVIDER_KEY")
settings = provider_settings({"name": sys.argv[2], "cpu": 1, "memory": "2GiB", "price-per-cpu-hour": "0.01"},
                             config.get("payment.platform"))
agent = Hostile(settings, make_runtime("process", sys.argv[2], policy=TransferPolicy.strict((), None)), wallet)
print("hostile provider", wallet.address, flush=True)
asyncio.run(ProviderDaemon(agent, wallet, sys.argv[1]).run_forever())
"""


def start_hostile(f: Any, tmp: Path, kind: str) -> str:
    import subprocess

    script = tmp / "hostile_provider.py"
    script.write_text(HOSTILE)
    key = os.urandom(32).hex()
    log = tmp / f"{kind}.log"
    proc = subprocess.Popen([sys.executable, str(script), f.url, kind], env={**f.env, "GOLEM_DASK_PROVIDER_KEY": key},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    f.providers[kind] = (proc, Wallet.from_key(key).address, log)
    return Wallet.from_key(key).address


def test_a_provider_cannot_raise_its_prices_after_it_was_chosen(anvil, tmp_path):  # noqa: F811
    with fleet(anvil, tmp_path, {}) as f, requestor(anvil, tmp_path):
        cheat = start_hostile(f, tmp_path, "raise-prices")  # the cheapest offer: chosen first
        wait_until(lambda: "hostile provider" in f.log("raise-prices"), 30, "the hostile provider")
        honest = f.start_provider("honest", "0.1")
        with GolemCluster(n_workers=1, market=f.url, budget="2") as cluster, Client(cluster) as client:
            assert client.submit(lambda: 6 * 7).result() == 42
            used = {w.deal.agreement.provider_id for w in cluster.workers.values()}
            declined = dict(cluster.negotiator.declined)
        bill = cluster.bill()
    assert used == {honest}
    assert any("approved other terms" in reason for reason in declined.values()), declined
    assert cheat not in {e.provider for e in bill.entries}
    assert balance(anvil, cheat) == 0


def test_a_provider_cannot_bill_more_than_it_delivered(anvil, tmp_path):  # noqa: F811
    with fleet(anvil, tmp_path, {}) as f, requestor(anvil, tmp_path):
        cheat = start_hostile(f, tmp_path, "inflate")
        wait_until(lambda: "hostile provider" in f.log("inflate"), 30, "the hostile provider")
        with GolemCluster(n_workers=1, market=f.url, budget="2") as cluster, Client(cluster) as client:
            assert client.submit(lambda: 6 * 7).result() == 42
        (entry,) = cluster.bill().entries
    assert entry.provider == cheat and entry.status == "rejected" and "exceeds our metering" in (entry.reason or "")
    assert balance(anvil, cheat) == 0


def test_a_provider_cannot_send_nan_usage(anvil, tmp_path):  # noqa: F811
    """A debit note with NaN usage cannot even be made by our code; a stranger crafting the
    bytes on a raw socket is refused by the hub, so no requestor ever sees it."""
    import socket

    import msgpack

    def signed(wallet: Wallet, kind: str, body: bytes) -> bytes:
        unsigned = wire.Envelope(wire.PROTOCOL_VERSION, kind, wallet.address, os.urandom(16).hex(), now_ms(), body,
                                 b"")
        return wire.frame(dataclasses.replace(unsigned, signature=wallet.sign_message_hash(unsigned.digest())))

    with fleet(anvil, tmp_path, {}) as f:
        mallory = Wallet.generate()
        nan = msgpack.ExtType(1, b"NaN")
        note = msgpack.ExtType(2, msgpack.packb(["DebitNote", ["a", "b", {P.USAGE_CPU_SEC: nan}, nan,
                                                               mallory.address, mallory.address, "id", 0]],
                                                use_bin_type=True))
        push = msgpack.packb({"to": Wallet.generate().address, "message": note}, use_bin_type=True)
        with socket.create_connection((f.host, f.port), timeout=10) as s:
            s.sendall(signed(mallory, "hello", msgpack.packb({"role": "provider"})))
            s.sendall(signed(mallory, "push", push))
            received = b""
            while chunk := s.recv(65536):
                received += chunk
    notices = []
    while len(received) >= 4:
        size = int.from_bytes(received[:4], "big")
        notices.append(wire.verify(wire.unframe(received[:4 + size])))
        received = received[4 + size:]
    assert notices[0] == {"hub": notices[0]["hub"]}  # welcome
    assert any("non-finite" in str(n.get("reason")) for n in notices[1:]), notices


# -- what the hub sees ------------------------------------------------------------------------------


class RecordingProxy:
    """A TCP relay in front of the hub that keeps every byte both ways: the hub's view."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket
        import threading

        self.target = target
        self.seen = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: Any, sink: Any) -> None:
        try:
            while chunk := source.recv(65536):
                with self._lock:
                    self.seen += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_the_hub_sees_no_secret(anvil, tmp_path):  # noqa: F811
    import http.server
    import threading

    marker = "s3cr3t-" + os.urandom(8).hex()
    headers: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            headers.append(self.headers.get("X-Secret", ""))
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "data.txt").write_text("41")
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    token = "t0k3n-" + os.urandom(8).hex()  # as in a presigned URL
    url = f"http://127.0.0.1:{web.server_address[1]}/data.txt?token={token}"
    try:
        with fleet(anvil, tmp_path, {}) as f, requestor(anvil, tmp_path):
            f.start_provider("p", "0.1", extra=("--allow-private-addresses",))
            proxy = RecordingProxy((f.host, f.port))
            try:
                with GolemCluster(n_workers=1, market=proxy.url, budget="2", inputs={url: "/golem/input/data.txt"},
                                  storage_options={"http": {"headers": {"X-Secret": marker}}}) as cluster:
                    assert cluster.scheduler_address.startswith("tls://")
                    with Client(cluster) as client:
                        value = client.submit(lambda: int(open("input/data.txt").read()) + 1).result()
            finally:
                proxy.close()
    finally:
        web.shutdown()
    assert value == 42
    assert headers and set(headers) == {marker}  # the provider had the secret, and used it
    seen = bytes(proxy.seen)
    assert len(seen) > 10_000  # the whole exchange went through the proxy
    # Neither the credential, nor the URL's token, nor the worker's TLS key (sent as a
    # base64 data: URL): the hub forwards only ciphertext of every transfer.  (The
    # provider's answer names what it copied, without credentials or query.)
    pem_key = base64.b64encode(b"-----BEGIN PRIVATE KEY-----")[:32]
    for needle in (marker.encode(), token.encode(), pem_key, b"data:application/octet-stream", b"X-Secret"):
        assert needle not in seen, needle


def test_a_provider_without_a_chain_takes_an_announced_payment_at_its_word() -> None:
    """It says so at start and in its log; its invoice is then settled, not re-sent for days."""
    from types import SimpleNamespace

    from golem_dask.protocol.messages import Invoice
    from golem_dask.provider.daemon import ProviderDaemon
    from golem_dask.provider.receivables import Receivables

    wallet = Wallet.generate()
    credited: dict[str, Decimal] = {}
    agent = SimpleNamespace(id=wallet.address, trusts_announcements=False, credit=credited.__setitem__)
    book = Receivables(":memory:")
    daemon = ProviderDaemon(agent, wallet, "tcp://127.0.0.1:9", None, book)  # type: ignore[arg-type]
    assert agent.trusts_announcements
    invoice = Invoice("agr", (), {}, Decimal("0.5"), wallet.address, "0xR", wallet.address, "0xR", "devnet")
    book.add(invoice)
    payment = Payment("0xR", wallet.address, Decimal("0.5"), "devnet", (invoice.id,), "0xtx", agreement_ids=("agr",))
    asyncio.run(daemon._verify_payment(payment))
    assert book.status(invoice.id) == "paid" and credited == {"agr": Decimal("0.5")}
