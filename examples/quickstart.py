"""Rent two workers on the embedded market, compute, and print the bill.

Run: python examples/quickstart.py
"""

import dask.array as da
from distributed import Client

from golem_dask import GolemCluster

if __name__ == "__main__":
    with GolemCluster(n_workers=2, cpu=1, memory="1GiB", budget="1") as cluster:
        with Client(cluster) as client:
            x = da.random.default_rng(0).random((4000, 4000), chunks=1000)
            print("mean:", x.mean().compute())
    print(cluster.bill())
