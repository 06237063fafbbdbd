"""Rent two workers on the embedded market, compute, check against NumPy, print the bill.

Run: python examples/quickstart.py
"""

import dask.array as da
import numpy as np
from distributed import Client

from golem_dask import GolemCluster

if __name__ == "__main__":
    x = np.random.default_rng(0).random((4000, 4000))
    with GolemCluster(n_workers=2, cpu=1, memory="1GiB", budget="1") as cluster:
        with Client(cluster):
            mean = da.from_array(x, chunks=1000).mean().compute()
    assert np.isclose(mean, x.mean()), (mean, x.mean())
    print(cluster.bill())
    print(f"OK: mean {mean:.6f}, paid {cluster.bill().total} GLM")
