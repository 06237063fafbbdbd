"""Adaptive scaling under a budget: the cluster grows with the work, never past what the
budget can reserve, says so once, and shrinks when the work is done.

Run: python examples/adaptive_budget.py
"""

import time
from decimal import Decimal

import dask
from distributed import Client

from golem_dask import GolemCluster


def busy(i: int) -> int:
    end = time.time() + 0.5
    while time.time() < end:
        pass
    return i


if __name__ == "__main__":
    budget = Decimal("0.1")
    # Paid as it goes, each 1-thread agreement reserves two payment periods of its worst case
    # (2 x 1 min at 0.1 GLM/cpu-hour + 0.02 GLM/hour = 0.004 GLM), so 0.1 GLM holds many;
    # the embedded provider sells this machine's cores, so at most 2 here.
    with dask.config.set({"golem.payment.pay-interval": "1m"}), \
            GolemCluster(n_workers=0, cpu=1, budget=str(budget)) as cluster, Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=2, wait_count=2, interval="500ms")
        assert sum(client.gather(client.map(busy, range(24)))) == sum(range(24))
        peak = len(cluster.bill().entries)
        deadline = time.time() + 60
        while cluster.workers and time.time() < deadline:  # idle: adapt retires them
            time.sleep(0.5)
        retired = not cluster.workers
    bill = cluster.bill()
    assert 1 <= peak <= 2 and retired, (peak, retired)
    assert bill.total <= budget and {e.status for e in bill.entries} == {"paid"}
    print(bill)
    print(f"OK: grew to {peak} workers and back to 0, paid {bill.total} of {budget} GLM")
