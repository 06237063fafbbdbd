"""Paying 1, 10 and 50 providers: one batch transaction against single transfers.

Runs on a real anvil node (``.ci/install-anvil`` installs it) with the shipped token and
batch contracts; every provider is a new holder, as in real use.  For each size it prints
gas per provider paid (batch and single, from the receipts), their ratio, and the wall
time of each way of paying, measured in the same run.

Target: a batch of 50 costs at most 0.52x the gas per provider of single transfers.

Run: python benchmarks/bench_batch.py [--sizes 1,10,50] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path


def main(args: argparse.Namespace) -> int:
    from golem_dask.payment.ethereum import EthereumPayer
    from golem_dask.payment.ledger import Ledger
    from golem_dask.chain.anvil import AnvilNode
    from golem_dask.chain.deploy import deploy_contracts, fund
    from golem_dask.protocol.identity import Wallet

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with AnvilNode() as node, tempfile.TemporaryDirectory() as tmp:
        node.start()
        contracts = deploy_contracts(node.web3(), node.accounts[0])
        w3 = node.web3()

        def payer(batch: bool) -> EthereumPayer:
            wallet = Wallet.generate()
            fund(w3, contracts["token"], node.accounts[0], wallet.address, Decimal(10_000), 10**19)
            return EthereumPayer(node.web3(), wallet=wallet, token_address=contracts["token"],
                                 batch_address=contracts["batch"] if batch else None,
                                 ledger=Ledger(Path(tmp) / f"{wallet.address}.sqlite"),
                                 batch_window_s=0.05, poll_interval=0.02)

        def pay(p: EthereumPayer, n: int) -> float:
            payees = [Wallet.generate().address for _ in range(n)]

            async def run() -> None:
                await asyncio.gather(*(p.pay(a, Decimal("0.01"), reference=f"{p.address}-{i}")
                                       for i, a in enumerate(payees)))

            started = time.perf_counter()
            asyncio.run(run())
            return time.perf_counter() - started

        def gas(p: EthereumPayer, kinds: set[str]) -> int:
            return sum(w3.eth.get_transaction_receipt(r.confirmed_hash)["gasUsed"]
                       for r in p.ledger.payments() if r.kind in kinds)

        for n in sizes:
            single, batched = payer(False), payer(True)
            t_single = pay(single, n)
            t_batch = pay(batched, n)
            g_single = gas(single, {"transfer"}) / n
            g_batch = gas(batched, {"batch", "transfer"}) / n
            approve = gas(batched, {"approve"})
            rows.append({"providers": n, "single gas/provider": round(g_single), "batch gas/provider": round(g_batch),
                         "ratio": round(g_batch / g_single, 3), "approve gas (once)": approve,
                         "single wall s": round(t_single, 3), "batch wall s": round(t_batch, 3)})

    header = list(rows[0])
    print("  ".join(f"{h:>20s}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>20s}" for h in header))
    at_50 = next((r for r in rows if r["providers"] == 50), None)
    ok = at_50 is None or at_50["ratio"] <= 0.52
    print("\n== targets ==")
    if at_50 is not None:
        print(f"   {'PASS' if ok else 'FAIL'}  batch of 50 <= 0.52x single gas per provider (measured {at_50['ratio']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,50")
    parser.add_argument("--json")
    sys.exit(main(parser.parse_args()))
