"""golem-dask: rent Dask workers on a Golem-protocol compute market.

Examples
--------
>>> from golem_dask import GolemCluster
>>> with GolemCluster(n_workers=1, cpu=1, memory="1GiB", budget="1") as cluster:
...     print(len(cluster.scheduler.workers))
1
"""

from __future__ import annotations

from golem_dask import config  # noqa: F401  registers the golem.* defaults
from golem_dask.errors import (
    ActivityError,
    BudgetExceededError,
    ConfigError,
    ConstraintSyntaxError,
    GolemDaskError,
    MarketError,
    NoOffersError,
    PaymentError,
)

__version__ = "0.1.0"

__all__ = [
    "ActivityError",
    "BudgetExceededError",
    "ConfigError",
    "ConstraintSyntaxError",
    "GolemCluster",
    "GolemDaskError",
    "GolemWorker",
    "MarketError",
    "NoOffersError",
    "PaymentError",
]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # The cluster imports distributed; keep `import golem_dask` cheap for the CLI
    # and for provider processes that never build a cluster.
    if name == "GolemCluster":
        from golem_dask.cluster import GolemCluster

        return GolemCluster
    if name == "GolemWorker":
        from golem_dask.worker import GolemWorker

        return GolemWorker
    raise AttributeError(name)
