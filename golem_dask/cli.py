"""The ``golem-dask`` command.

``golem-dask demo`` rents workers on the embedded market, runs a dask.array computation
on them, checks it against NumPy, and prints the bill with its transaction hashes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def demo(workers: int, budget: str, size: int) -> int:
    """Run the main job on the embedded default and print the result and the bill."""
    import dask
    import dask.array as da
    from distributed import Client

    from golem_dask import GolemCluster

    print(f"golem-dask demo: renting {workers} workers on the embedded market (budget {budget} GLM)")
    started = time.perf_counter()
    # The demo prints every event itself, so not the progress line too.
    with dask.config.set({"golem.cluster.progress": False}), GolemCluster(n_workers=workers, budget=budget) as cluster:
        cluster.events.subscribe(lambda event: print(f"  {event}"))
        for event in cluster.events:
            print(f"  {event}")
        print(f"cluster ready in {time.perf_counter() - started:.1f}s: {cluster}")
        with Client(cluster) as client:
            x = da.random.default_rng(2026).random((size, size), chunks=size // 4)
            data = x.compute()  # the same numbers, for NumPy to check against
            computed = float(((x - x.mean(axis=0)) ** 2).sum().compute())
            print(f"computed on {len(client.scheduler_info()['workers'])} rented workers: {computed:.6f}")
        expected = float(((data - data.mean(axis=0)) ** 2).sum())
        print(f"NumPy on this machine:                {expected:.6f}")
        print("closing: retiring workers, checking invoices, paying providers ...")
    bill = cluster.bill()
    print()
    print(bill)
    print()
    print(f"token {cluster.payer.token_address} on chain {cluster.payer.chain_id}; "
          f"requestor balance now {cluster.payer.token.functions.balanceOf(cluster.payer.address).call()} wei")
    ok = abs(computed - expected) <= 1e-9 * abs(expected) and bill.total > 0
    return 0 if ok else 1


def ledger(path: str | None, as_json: bool) -> int:
    """Print the ledger's debts and payments."""
    import os

    from golem_dask.config import ledger_path
    from golem_dask.payment.ledger import Ledger, dumps

    path = path or ledger_path()
    if not os.path.exists(path):
        print(f"no ledger at {path}", file=sys.stderr)
        return 1
    book = Ledger(path)
    print(dumps(book.report()) if as_json else book.table())
    return 0


def pay(hub_url: str | None = None, wait_s: float = 60.0) -> int:
    """Settle what the configured requestor owes; exit 1 if any debt is left.

    First what the ledger says was accepted but not paid (a requestor that stopped before
    its invoices arrived); with ``hub_url``, then the invoices providers re-send there for
    the agreements still open, checked against the terms the requestor signed.
    """
    import asyncio

    from golem_dask.errors import GolemDaskError
    from golem_dask.payment.factory import payer_from_config
    from golem_dask.payment.commitments import close_settled
    from golem_dask.payment.recovery import Recovery

    before: set[str] = set()

    async def run() -> Recovery:
        payer = payer_from_config()
        before.update(r.id for r in payer.ledger.payments())
        market = None
        if hub_url:
            from golem_dask.market.hub_market import HubMarket

            market = HubMarket(hub_url, payer.wallet)
        try:
            recovery = Recovery(payer, market)
            if market is not None:
                await market.start()
            await recovery.pay_accepted()
            await recovery.answer_invoices(wait_s)
            await payer.settle()
            close_settled(recovery.book, payer.address)
            return recovery
        finally:
            if market is not None:
                await market.close()

    try:
        recovery = asyncio.run(run())
    except GolemDaskError as e:
        print(f"golem-dask pay: {e}", file=sys.stderr)
        return 1
    payer, report = recovery.payer, recovery.report
    for document in report.recovered:
        print(f"paid what was accepted before the requestor stopped: {document}")
    for invoice in report.invoices_paid:
        print(f"invoice {invoice} answered and paid")
    for invoice, reason in report.invoices_rejected.items():
        print(f"invoice {invoice} rejected: {reason}")
    confirmed = [r for r in payer.ledger.payments() if r.status == "confirmed" and r.id not in before]
    for record in confirmed:
        print(f"{record.kind} nonce {record.nonce}: {len(record.debt_ids)} debts paid in {record.confirmed_hash}")
    left = payer.owed()
    for debt in left:
        print(f"still owed: {debt.amount} GLM to {debt.payee} (invoice {debt.invoice_id}, {debt.status})")
    still_open = recovery.book.open_agreements(payer.address)
    for agreement, _ in still_open:
        print(f"agreement {agreement.id} with {agreement.provider_id} has no invoice yet"
              + ("" if hub_url else " (run with --hub to receive it)"))
    print(f"{len(confirmed)} payments confirmed; {len(left)} debts still owed; {len(still_open)} agreements still open")
    return 1 if left else 0


def hub(listen: str, data_dir: str | None = None) -> int:
    """Run a hub until interrupted."""
    import asyncio
    import logging

    from golem_dask.market.hub import HubServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, _, port = listen.rpartition(":")
    server = HubServer(host or "127.0.0.1", int(port), data_dir=data_dir)

    async def run() -> None:
        await server.start()
        print(f"hub listening on {server.url}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def devnet(args: argparse.Namespace) -> int:
    """Run a development chain for the many-machines mode until interrupted: anvil with the
    token and batch contracts, the given addresses funded, and the configuration to export."""
    import signal
    from decimal import Decimal, InvalidOperation

    from golem_dask.chain.anvil import AnvilNode
    from golem_dask.chain.deploy import deploy_contracts, fund
    from golem_dask.errors import GolemDaskError
    from golem_dask.protocol.identity import checksum_address

    try:
        tokens = Decimal(args.tokens)
        addresses = [checksum_address(a) for a in args.fund]
    except (InvalidOperation, ValueError) as e:
        print(f"golem-dask devnet: {e}", file=sys.stderr)
        return 2
    try:
        node = AnvilNode(binary=args.anvil, host=args.host, port=args.port, state_dir=args.state_dir).start()
    except GolemDaskError as e:
        print(f"golem-dask devnet: {e}", file=sys.stderr)
        return 1
    try:
        w3, deployer = node.web3(), node.accounts[0]
        saved = node.state_dir / "devnet.json"  # a kept chain keeps its contracts
        contracts = json.loads(saved.read_text()) if args.state_dir and saved.is_file() else None
        if not contracts or not w3.eth.get_code(contracts["token"]):
            contracts = deploy_contracts(w3, deployer)
            saved.write_text(json.dumps(contracts))
        for address in addresses:
            fund(w3, str(contracts["token"]), deployer, address, tokens)
        url = node.url
        if args.host in ("0.0.0.0", "::"):  # listening everywhere: others reach it by this machine's name
            import socket

            url = f"http://{socket.gethostname()}:{args.port}"
        lines = {"RPC_URL": url, "CHAIN_ID": str(node.chain_id), "TOKEN_ADDRESS": contracts["token"]}
        if contracts.get("batch"):
            lines["BATCH_ADDRESS"] = contracts["batch"]
        print(f"# a development chain at {node.url}; export these for requestors and providers:")
        for key, value in lines.items():
            print(f"export DASK_GOLEM__PAYMENT__{key}={value}")
        for address in addresses:
            print(f"# funded {address}: {tokens} GLM and 1 ETH for gas")
        print("# Ctrl-C stops it", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        node.close()
    return 0


def provider_isolation(runtime: str, network: str) -> list[str]:
    """What ``golem-dask provider`` tells its operator it cannot keep from strangers' workers."""
    import os

    if runtime == "process":
        import getpass

        return [
            "WARNING: --runtime process does not isolate strangers' workers from this machine:",
            f"  - they run as this daemon's user ({getpass.getuser()}, uid {os.geteuid()}) and can read and write "
            "whatever it can",
            "  - they see this machine's whole filesystem, processes and network (loopback services, the LAN, "
            "cloud metadata at 169.254.169.254)",
            "  - no memory, process-count or disk limits beyond dask's own --memory-limit",
            "  - their environment is scrubbed (PATH, locale, HOME and TMPDIR in the working directory, "
            "thread-pool sizes): the wallet key and golem-dask's settings are not in it",
            "  Use --runtime docker (the default) to sell to strangers.",
        ]
    lines = ["containers run as a non-root user with every capability dropped, no-new-privileges, "
             "a pids limit and the agreed memory without swap"]
    if network == "host":
        lines.append("WARNING: --docker-network host: workers share this machine's network, its loopback services "
                     "included; the default is bridge")
    else:
        lines.append(f"containers are on docker network {network!r}: they cannot reach this machine's loopback, "
                     "but can reach its LAN and cloud metadata (169.254.169.254) unless a firewall rule "
                     "(DOCKER-USER chain) blocks them")
    return lines


def provider(args: argparse.Namespace) -> int:
    """Run a provider daemon until interrupted."""
    import asyncio
    import logging
    import os
    from pathlib import Path

    from golem_dask import config
    from golem_dask.errors import GolemDaskError
    from golem_dask.protocol.identity import Wallet
    from golem_dask.provider.agent import ProviderAgent
    from golem_dask.provider.daemon import ProviderDaemon
    from golem_dask.provider.factory import make_runtime, provider_settings
    from golem_dask.provider.payment_check import PaymentCheck
    from golem_dask.provider.receivables import Receivables
    from golem_dask.provider.runtime.policy import TransferPolicy

    if args.runtime == "process" and not args.allow_unisolated_process:
        print("golem-dask provider: --runtime process runs strangers' code as this user, with this machine's files, "
              "network and environment; it sells only with --allow-unisolated-process. "
              "Use --runtime docker (the default) to isolate workers in containers.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.key_file:
            wallet = Wallet.from_key(Path(args.key_file).read_text().strip())
        else:
            wallet = Wallet.from_env(args.key_env)
        entry = {"name": args.name, "cpu": args.cpu, "memory": args.memory, "storage": args.storage,
                 "price-per-cpu-hour": args.price_per_cpu_hour, "price-per-hour": args.price_per_hour,
                 "start-price": args.start_price}
        settings = provider_settings(entry, config.get("payment.platform"))
        policy = TransferPolicy.strict(args.allow_scheme, True if args.allow_private_addresses else None)
        runtime = make_runtime(args.runtime, args.name, policy=policy, network=args.docker_network)
        agent = ProviderAgent(settings, runtime, wallet)
        rpc = args.rpc_url or config.get("payment.rpc-url")
        token = config.address("payment.token-address", args.token_address)
        check = PaymentCheck(rpc, str(token)) if rpc and token else None
        data_dir = Path(os.path.expanduser(args.data_dir or config.get("provider.data-dir")))
        receivables = Receivables(data_dir / f"receivables-{wallet.address}.sqlite")
        daemon = ProviderDaemon(agent, wallet, args.hub, check, receivables)
    except (GolemDaskError, OSError) as e:
        print(f"golem-dask provider: {e}", file=sys.stderr)
        return 1
    print(f"provider {args.name} at {wallet.address}", flush=True)
    print(f"runtime {args.runtime}; {policy.describe()}", flush=True)
    if check is None:
        print("payments: no chain to check them on (--rpc-url, --token-address): an announced payment is taken "
              "at the requestor's word; sell to strangers only with a chain", flush=True)
    for line in provider_isolation(args.runtime, args.docker_network):
        print(line, flush=True)
    try:
        asyncio.run(daemon.run_forever())
    except KeyboardInterrupt:
        pass
    return 0


def providers(path: str | None, as_json: bool) -> int:
    """Print the reputation store: one provider per line."""
    import os

    from golem_dask.market.reputation import Reputation

    path = path or Reputation.default_path()
    if not os.path.exists(path):  # reading makes no file
        print(f"no providers remembered yet (no {path})", file=sys.stderr)
        return 0
    records = Reputation(path).records()
    if as_json:
        print(json.dumps([{"address": r.address, "name": r.name, "agreements": r.agreements,
                           "delivered": None if r.delivered is None else str(r.delivered),
                           "failures": r.failures, "refusals": r.refusals, "flagged": r.flagged} for r in records]))
        return 0
    print(f"{'provider':44s} {'name':16s} {'agreements':>10s} {'delivered':>9s} {'failures':>8s} "
          f"{'refusals':>8s} {'caught':>6s}")
    for r in records:
        delivered = "-" if r.delivered is None else f"{r.delivered:.0%}"
        print(f"{r.address:44s} {r.name[:16]:16s} {r.agreements:10d} {delivered:>9s} {r.failures:8d} "
              f"{r.refusals:8d} {r.flagged:6d}")
    return 0


def status(as_json: bool) -> int:
    """Print each GolemCluster running on this machine: its workers and its money."""
    import urllib.request

    from golem_dask.dashboard import registry, running_clusters

    shown = []
    for record in running_clusters():
        try:
            with urllib.request.urlopen(f"{record['dashboard']}/golem.json", timeout=5) as answer:
                found = json.loads(answer.read())
            record = {**record, "money": str(found["money"]), "workers": list(found["workers"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            record = {**record, "error": f"its dashboard did not answer as a Golem page: {e}"}
        shown.append(record)
    if as_json:
        print(json.dumps(shown))
        return 0
    if not shown:
        print(f"no GolemCluster is running on this machine (none listed in {registry()})")
        return 0
    for record in shown:
        print(f"{record['name']} (process {record['pid']}), dashboard {record['dashboard']}/golem")
        if "error" in record:
            print(f"  {record['error']}")
            continue
        print(f"  {record['money']}")
        for w in record["workers"]:
            print("  " + "  ".join(f"{k}={v}" for k, v in w.items()))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "golem-dask") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Rent Dask workers from a market of compute providers and pay them per use; "
        "sell this machine's, run a market hub or a development chain.",
        epilog=f"'{prog} COMMAND --help' explains each command. Configuration: golem.* in dask.config "
        "(DASK_GOLEM__... environment variables).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a computation on rented workers and print the bill")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget", default="1", help="GLM the cluster may spend (default: 1)")
    p.add_argument("--size", type=int, default=2000, help="side of the square array (default: 2000)")
    sub.add_parser("version", help="print the version")
    st = sub.add_parser("status", help="the GolemClusters running on this machine: their workers, providers, "
                                       "costs and money")
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    img = sub.add_parser("image", help="worker images")
    img_sub = img.add_subparsers(dest="image_command", required=True)
    b = img_sub.add_parser("build", help="build a worker image holding this environment (its packages at their "
                                         "versions; Python, dask and distributed as this client's)")
    b.add_argument("--tag", help="image tag (default: golem-dask-worker:py<X.Y>-dask<version>)")
    b.add_argument("--base", help="base image with python3 and python3-venv (default: debootstrap bookworm)")
    b.add_argument("--package", action="append", default=[], help="extra package to install (repeatable)")
    b.add_argument("--requirements", metavar="FILE",
                   help="install this pip requirements file instead of this environment's packages")
    b.add_argument("--exclude", action="append", default=[], metavar="NAME",
                   help="leave this environment's package NAME out of the image (repeatable)")
    b.add_argument("--gvmi", action="store_true",
                   help="also convert it to a Golem VM image (GVMI) for market='yagna' (needs mksquashfs)")
    b.add_argument("--output", help="the GVMI file (default: <tag>.gvmi here)")
    b.add_argument("--url", help="where the GVMI will be served (a folder URL ending in / or the file's URL), "
                                 "for the package reference printed")
    led = sub.add_parser("ledger", help="list debts and payments from the durable ledger")
    led.add_argument("--json", action="store_true", help="print JSON instead of a table")
    led.add_argument("--path", help="ledger file (default: <golem.payment.data-dir>/ledger.sqlite)")
    prov = sub.add_parser("providers", help="what this requestor remembers of providers: delivered capacity, "
                                            "failures, refusals")
    prov.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prov.add_argument("--path", help="reputation file (default: <golem.payment.data-dir>/reputation.sqlite)")
    pay_parser = sub.add_parser("pay", help="reconcile with the chain and pay every debt still owed (golem.payment.* "
                                            "config), also what a stopped requestor accepted")
    pay_parser.add_argument("--hub", help="tcp://HOST:PORT: also answer the invoices providers re-send there")
    pay_parser.add_argument("--wait", default="60s", help="how long to wait for re-sent invoices (default 60s)")
    dn = sub.add_parser("devnet", help="run a development chain (anvil) with the token and batch contracts, fund "
                                       "addresses, print the golem.payment.* lines to export")
    dn.add_argument("--fund", action="append", default=[], metavar="ADDRESS",
                    help="give ADDRESS tokens and 1 ETH for gas (repeatable)")
    dn.add_argument("--tokens", default="100", help="GLM for each funded address (default 100)")
    dn.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; providers on "
                                                        "other hosts need one they reach)")
    dn.add_argument("--port", type=int, default=8545)
    dn.add_argument("--anvil", help="the anvil binary (default: $GOLEM_DASK_ANVIL, then PATH)")
    dn.add_argument("--state-dir", help="keep the chain here between runs (default: a fresh chain each time)")
    h = sub.add_parser("hub", help="run a market hub")
    h.add_argument("--listen", default="127.0.0.1:7470",
                   help="HOST:PORT (default 127.0.0.1:7470; 7465 is the yagna daemon's)")
    h.add_argument("--data-dir", help="where pushes for peers that are away are kept (default: golem.hub.data-dir)")
    pr = sub.add_parser("provider", help="sell this machine through a hub")
    pr.add_argument("--hub", required=True, help="tcp://HOST:PORT")
    pr.add_argument("--name", default="provider")
    pr.add_argument("--cpu", type=int, help="threads to sell (default: all cores)")
    pr.add_argument("--memory", help="memory to sell, e.g. 8GiB (default: 80%% of this machine)")
    pr.add_argument("--storage", default="10GiB")
    pr.add_argument("--runtime", default="docker", choices=["process", "docker"],
                    help="docker (default): each worker in a hardened container; process: a child process of "
                    "this daemon, unisolated (needs --allow-unisolated-process)")
    pr.add_argument("--allow-unisolated-process", action="store_true",
                    help="sell --runtime process to strangers: their code runs as this user, sees this machine")
    pr.add_argument("--docker-network", default="bridge",
                    help="docker network of the containers (default: bridge; host shares this machine's network)")
    pr.add_argument("--allow-scheme", action="append", default=[], metavar="SCHEME",
                    help="also allow transfers with this fsspec protocol (repeatable; default: "
                    "golem.provider.transfer-schemes; never file)")
    pr.add_argument("--allow-private-addresses", action="store_true",
                    help="allow transfers to private, loopback and link-local addresses "
                    "(golem.provider.allow-private-addresses)")
    pr.add_argument("--price-per-cpu-hour", default="0.1")
    pr.add_argument("--price-per-hour", default="0.02")
    pr.add_argument("--start-price", default="0")
    pr.add_argument("--key-env", default="GOLEM_DASK_PROVIDER_KEY",
                    help="environment variable holding the wallet key (never pass a key as an argument)")
    pr.add_argument("--key-file", help="file holding the wallet key (hex)")
    pr.add_argument("--rpc-url", help="chain to verify payments on (default: golem.payment.rpc-url)")
    pr.add_argument("--token-address", help="token to verify payments in (default: golem.payment.token-address)")
    pr.add_argument("--data-dir", help="where invoices wait to be paid (default: golem.provider.data-dir)")
    args = parser.parse_args(argv)
    if args.command == "hub":
        return hub(args.listen, args.data_dir)
    if args.command == "devnet":
        return devnet(args)
    if args.command == "provider":
        return provider(args)
    if args.command == "ledger":
        return ledger(args.path, args.json)
    if args.command == "status":
        return status(args.json)
    if args.command == "providers":
        return providers(args.path, args.json)
    if args.command == "pay":
        from dask.utils import parse_timedelta

        return pay(args.hub, float(parse_timedelta(args.wait, default="s")))
    if args.command == "image":
        from golem_dask.image import build, build_gvmi

        if args.requirements and not Path(args.requirements).is_file():
            parser.error(f"--requirements {args.requirements}: no such file")
        tag = build(args.tag, args.base, args.package, requirements=args.requirements, exclude=args.exclude)
        print(tag)
        if args.gvmi:
            image = build_gvmi(tag, args.output)
            reference = image.reference(args.url or "<URL of the file>")
            print(f"{image.path}\nserve it over HTTP, then: GolemCluster(market='yagna', image='{reference}')")
        return 0
    if args.command == "version":
        from golem_dask import __version__

        print(__version__)
        return 0
    return demo(args.workers, args.budget, args.size)


if __name__ == "__main__":
    sys.exit(main())
