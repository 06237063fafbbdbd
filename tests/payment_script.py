"""A requestor paying three providers, run as its own process by the crash tests.

Usage: python payment_script.py LEDGER CRASH_AT PAYEE:AMOUNT...
The key comes from GOLEM_DASK_PRIVATE_KEY, the chain from golem.payment.* (DASK_GOLEM__...)
config.  CRASH_AT names a step ("debt", "signed", "sent", "receipt") at which the process
kills itself with SIGKILL, or "none".
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from decimal import Decimal

import dask

from golem_dask.payment.ethereum import EthereumPayer


def main() -> None:
    data_dir, crash_at, *debts = sys.argv[1:]

    def on_step(step: str) -> None:
        if step == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    with dask.config.set({"golem.payment.data-dir": data_dir}):
        payer = EthereumPayer.from_config(on_step=on_step)

    async def run() -> None:
        await payer.settle()  # reconcile what an earlier run left, then pay what is owed
        pays = []
        for i, item in enumerate(debts):
            payee, amount = item.split(":")
            pays.append(payer.pay(payee, Decimal(amount), reference=f"invoice-{i}"))
        for t in await asyncio.gather(*pays):
            print("paid", t.payee, t.amount_wei, t.tx_hash, flush=True)

    asyncio.run(run())


if __name__ == "__main__":
    main()
