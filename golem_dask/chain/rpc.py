"""Reaching an Ethereum node over JSON-RPC.

:func:`connect` gives a ``web3.Web3`` for an HTTP URL with the timeout from
``golem.chain.rpc-timeout``; :func:`call` makes one JSON-RPC call with the standard
library alone (web3 costs more than a second to import, too much for a start-up probe).
"""

from __future__ import annotations

import json
import urllib.request
from typing import TYPE_CHECKING, Any

from golem_dask import config
from golem_dask.errors import PaymentError

if TYPE_CHECKING:
    from web3 import Web3


def connect(url: str, timeout_s: float | None = None) -> Web3:
    """A ``web3.Web3`` talking to the node at ``url`` (``http://`` or ``https://``).

    Each request waits at most ``timeout_s`` (default ``golem.chain.rpc-timeout``).
    Nothing is sent yet: the first call finds out whether the node answers.
    """
    from web3 import HTTPProvider, Web3  # lazy: ~1.4 s import

    timeout = config.seconds("chain.rpc-timeout") if timeout_s is None else timeout_s
    return Web3(HTTPProvider(url, request_kwargs={"timeout": timeout}))


def call(url: str, method: str, params: list[Any] | None = None, timeout_s: float = 2.0) -> Any:
    """One JSON-RPC call; the node's error becomes :class:`~golem_dask.errors.PaymentError`.

    Network failures raise ``OSError`` (refused, reset, timed out), for callers that
    poll a node while it starts.
    """
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        reply = json.loads(response.read())
    if "error" in reply:
        raise PaymentError(f"{method} failed: {reply['error']}")
    return reply["result"]
