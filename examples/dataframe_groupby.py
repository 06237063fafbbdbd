"""A dask.dataframe groupby-aggregate on rented workers, checked against pandas.

Run: python examples/dataframe_groupby.py
"""

import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client

from golem_dask import GolemCluster

if __name__ == "__main__":
    rng = np.random.default_rng(1)
    pdf = pd.DataFrame({"key": rng.integers(0, 10, 100_000), "value": rng.random(100_000)})
    with GolemCluster(n_workers=2, budget="1", max_price_per_cpu_hour="0.5") as cluster:
        with Client(cluster):
            result = dd.from_pandas(pdf, npartitions=8).groupby("key").value.mean().compute()
    pd.testing.assert_series_equal(result.sort_index(), pdf.groupby("key").value.mean())
    print(result.sort_index())
    print(cluster.bill())
    print(f"OK: {len(result)} groups, paid {cluster.bill().total} GLM")
