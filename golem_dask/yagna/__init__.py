"""The public Golem network, through the user's ``yagna`` daemon.

``GolemCluster(market="yagna")`` rents workers from the providers the daemon's market
finds and pays them through the daemon's payment service:

* :mod:`~golem_dask.yagna.api`: the REST session with the daemon (its address and app
  key from ``YAGNA_API_URL`` and ``YAGNA_APPKEY``), the requestor's identity and the
  allocation that holds the cluster's budget;
* :mod:`~golem_dask.yagna.market`: :class:`YagnaMarket`, the market seam on the
  daemon's market, activity and payment APIs;
* :mod:`~golem_dask.yagna.payer`: :class:`YagnaPayer`, the payer seam: accepting an
  invoice is what pays it; the payer runs the daemon's payment cycle at once and waits
  until the daemon reports the transfer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["YagnaDaemon", "YagnaMarket", "YagnaPayer"]


def __getattr__(name: str) -> Any:
    if name == "YagnaDaemon":
        from golem_dask.yagna.api import YagnaDaemon

        return YagnaDaemon
    if name == "YagnaMarket":
        from golem_dask.yagna.market import YagnaMarket

        return YagnaMarket
    if name == "YagnaPayer":
        from golem_dask.yagna.payer import YagnaPayer

        return YagnaPayer
    raise AttributeError(name)
