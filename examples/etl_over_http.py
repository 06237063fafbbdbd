"""An ETL job that reads its input where it lives, through fsspec, on rented workers.

The workers read ``sales.csv`` over HTTP with dask's own reader (on docker workers too:
``golem-dask image build`` put fsspec's HTTP backend in the worker image), join it with a
small table, aggregate by region, and the result is checked against pandas.  Here a local
HTTP server stands in for wherever your data is (any fsspec URL: s3://, gs://, https://).

Run: python examples/etl_over_http.py
"""

import functools
import http.server
import tempfile
import threading
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client

from golem_dask import GolemCluster


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    rng = np.random.default_rng(7)
    sales = pd.DataFrame({"store": rng.integers(0, 50, 200_000), "amount": rng.random(200_000).round(2)})
    stores = pd.DataFrame({"store": range(50), "region": [f"region-{i % 5}" for i in range(50)]})
    with tempfile.TemporaryDirectory() as folder:
        sales.to_csv(Path(folder) / "sales.csv", index=False)
        server, base = serve(Path(folder))
        try:
            with GolemCluster(n_workers=2, budget="1") as cluster, Client(cluster):
                frame = dd.read_csv(f"{base}/sales.csv", blocksize="1MB")
                by_region = frame.merge(stores, on="store").groupby("region").amount.sum().compute()
        finally:
            server.shutdown()
    expected = sales.merge(stores, on="store").groupby("region").amount.sum()
    pd.testing.assert_series_equal(by_region.sort_index(), expected, check_exact=False, check_index_type=False)
    print(by_region.sort_index())
    print(cluster.bill())
    print(f"OK: {len(by_region)} regions on {cluster.runtime} workers, paid {cluster.bill().total} GLM")
