"""The ``golem-dask`` command.

``golem-dask demo`` rents workers on the embedded market, runs a dask.array computation
on them, checks it against NumPy, and prints the bill with its transaction hashes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def demo(workers: int, budget: str, size: int) -> int:
    """Run the main job on the embedded default and print the result and the bill."""
    import dask.array as da
    from distributed import Client

    from golem_dask import GolemCluster

    print(f"golem-dask demo: renting {workers} workers on the embedded market (budget {budget} GLM)")
    started = time.perf_counter()
    with GolemCluster(n_workers=workers, budget=budget) as cluster:
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

    from golem_dask.payment.factory import ledger_path
    from golem_dask.payment.ledger import Ledger, dumps

    path = path or ledger_path()
    if not os.path.exists(path):
        print(f"no ledger at {path}", file=sys.stderr)
        return 1
    book = Ledger(path)
    print(dumps(book.report()) if as_json else book.table())
    return 0


def pay() -> int:
    """Settle every owed debt of the configured requestor; exit 1 if any is left."""
    import asyncio

    from golem_dask.errors import GolemDaskError
    from golem_dask.payment.ethereum import EthereumPayer

    try:
        payer = EthereumPayer.from_config()
        done = asyncio.run(payer.settle())
    except GolemDaskError as e:
        print(f"golem-dask pay: {e}", file=sys.stderr)
        return 1
    for record in done:
        print(f"{record.kind} nonce {record.nonce}: {len(record.debt_ids)} debts paid in {record.confirmed_hash}")
    left = payer.owed()
    for debt in left:
        print(f"still owed: {debt.amount} GLM to {debt.payee} (invoice {debt.invoice_id}, {debt.status})")
    print(f"{len(done)} payments confirmed; {len(left)} debts still owed")
    return 1 if left else 0


def hub(listen: str) -> int:
    """Run a hub until interrupted."""
    import asyncio
    import logging

    from golem_dask.market.hub import HubServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, _, port = listen.rpartition(":")
    server = HubServer(host or "127.0.0.1", int(port))

    async def run() -> None:
        await server.start()
        print(f"hub listening on {server.url}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def provider(args: argparse.Namespace) -> int:
    """Run a provider daemon until interrupted."""
    import asyncio
    import logging
    from pathlib import Path

    from golem_dask import config
    from golem_dask.errors import GolemDaskError
    from golem_dask.protocol.identity import Wallet
    from golem_dask.provider.agent import ProviderAgent
    from golem_dask.provider.daemon import ProviderDaemon
    from golem_dask.provider.factory import make_runtime, provider_settings
    from golem_dask.provider.payment_check import PaymentCheck

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
        agent = ProviderAgent(settings, make_runtime(args.runtime, args.name), wallet)
        rpc = args.rpc_url or config.get("payment.rpc-url")
        token = config.address("payment.token-address", args.token_address)
        check = PaymentCheck(rpc, str(token)) if rpc and token else None
        daemon = ProviderDaemon(agent, wallet, args.hub, check)
    except (GolemDaskError, OSError) as e:
        print(f"golem-dask provider: {e}", file=sys.stderr)
        return 1
    print(f"provider {args.name} at {wallet.address}", flush=True)
    try:
        asyncio.run(daemon.run_forever())
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="golem-dask", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a computation on rented workers and print the bill")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget", default="1", help="GLM the cluster may spend (default: 1)")
    p.add_argument("--size", type=int, default=2000, help="side of the square array (default: 2000)")
    sub.add_parser("version", help="print the version")
    img = sub.add_parser("image", help="worker images")
    img_sub = img.add_subparsers(dest="image_command", required=True)
    b = img_sub.add_parser("build", help="build a worker image matching this Python, dask and distributed")
    b.add_argument("--tag", help="image tag (default: golem-dask-worker:py<X.Y>-dask<version>)")
    b.add_argument("--base", help="base image with python3 and python3-venv (default: debootstrap bookworm)")
    b.add_argument("--package", action="append", default=[], help="extra package to install (repeatable)")
    led = sub.add_parser("ledger", help="list debts and payments from the durable ledger")
    led.add_argument("--json", action="store_true", help="print JSON instead of a table")
    led.add_argument("--path", help="ledger file (default: <golem.payment.data-dir>/ledger.sqlite)")
    sub.add_parser("pay", help="reconcile with the chain and pay every debt still owed (golem.payment.* config)")
    h = sub.add_parser("hub", help="run a market hub")
    h.add_argument("--listen", default="127.0.0.1:7465", help="HOST:PORT (default 127.0.0.1:7465)")
    pr = sub.add_parser("provider", help="sell this machine through a hub")
    pr.add_argument("--hub", required=True, help="tcp://HOST:PORT")
    pr.add_argument("--name", default="provider")
    pr.add_argument("--cpu", type=int, help="threads to sell (default: all cores)")
    pr.add_argument("--memory", help="memory to sell, e.g. 8GiB (default: 80%% of this machine)")
    pr.add_argument("--storage", default="10GiB")
    pr.add_argument("--runtime", default="process", choices=["process", "docker"])
    pr.add_argument("--price-per-cpu-hour", default="0.1")
    pr.add_argument("--price-per-hour", default="0.02")
    pr.add_argument("--start-price", default="0")
    pr.add_argument("--key-env", default="GOLEM_DASK_PROVIDER_KEY",
                    help="environment variable holding the wallet key (never pass a key as an argument)")
    pr.add_argument("--key-file", help="file holding the wallet key (hex)")
    pr.add_argument("--rpc-url", help="chain to verify payments on (default: golem.payment.rpc-url)")
    pr.add_argument("--token-address", help="token to verify payments in (default: golem.payment.token-address)")
    args = parser.parse_args(argv)
    if args.command == "hub":
        return hub(args.listen)
    if args.command == "provider":
        return provider(args)
    if args.command == "ledger":
        return ledger(args.path, args.json)
    if args.command == "pay":
        return pay()
    if args.command == "image":
        from golem_dask.image import build

        print(build(args.tag, args.base, args.package))
        return 0
    if args.command == "version":
        from golem_dask import __version__

        print(__version__)
        return 0
    return demo(args.workers, args.budget, args.size)


if __name__ == "__main__":
    sys.exit(main())
