"""The scheduler of a GolemCluster: dask's, with certificate roles enforced.

With TLS every peer shows a certificate of the cluster's CA (:mod:`golem_dask.tls`).  A
worker certificate (what each provider gets) opens only what a worker needs of the
scheduler (registering under its own name, heartbeats, asking who has a key); every
other operation, a client session above all, needs the requestor's client certificate.
Without TLS (workers on the requestor's own machine) nothing changes.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from distributed import Scheduler
from distributed.core import _expects_comm
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.http.utils import get_handlers

from golem_dask.tls import role_of

logger = logging.getLogger(__name__)

#: What a worker certificate may ask of the scheduler.
WORKER_OPERATIONS = frozenset({"register-worker", "heartbeat_worker", "who_has"})
#: Roles that may do anything: the requestor's own clients, and its scheduler.
TRUSTED_ROLES = frozenset({"client", "scheduler"})


#: What a peer gets when it asks for an operation its certificate's role does not allow: the
#: built-in PermissionError, which a worker (whose image holds no golem-dask) can unpickle.
#: A task that opens a client on its worker (``get_client``, joblib's Dask backend) meets it:
#: a provider's worker may not act for the requestor on the rest of the cluster.
RoleRefused = PermissionError


def _guard(op: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    takes_comm = _expects_comm(handler)
    takes_serializers = "serializers" in inspect.signature(handler).parameters

    async def guarded(comm: Any, serializers: Any = None, **msg: Any) -> Any:
        peer = role_of(getattr(comm, "extra_info", {}).get("peercert"))
        if peer is not None and peer[0] not in TRUSTED_ROLES:
            role, name = peer
            if role != "worker" or op not in WORKER_OPERATIONS:
                logger.warning("refused %r from %s (certificate role %s, name %s)", op, comm.peer_address, role, name)
                raise RoleRefused(f"a {role} certificate may not call {op!r} on this scheduler: workers rented "
                                  "from strangers may not act as clients (get_client, worker_client, joblib's "
                                  "Dask backend); submit tasks from the client instead")
            if op == "register-worker" and str(msg.get("name")) != name:
                logger.warning("refused a worker registering as %r with the certificate of %r", msg.get("name"), name)
                raise RoleRefused(f"the certificate of worker {name!r} cannot register worker {msg.get('name')!r}")
        if takes_serializers:
            msg["serializers"] = serializers
        result = handler(comm, **msg) if takes_comm else handler(**msg)
        if inspect.isawaitable(result):
            result = await result
        return result

    guarded.__name__ = f"guarded_{getattr(handler, '__name__', op)}"
    return guarded


class GolemScheduler(Scheduler):
    """A :class:`distributed.Scheduler` whose handlers check the caller's certificate role."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The dashboard's Golem page (golem_dask.dashboard), beside dask's own routes.
        self.http_application.add_handlers(".*$", get_handlers(self, ["golem_dask.dashboard"],
                                                               kwargs.get("http_prefix", "/")))
        self.removed = _Removed()
        self.add_plugin(self.removed)
        self.handlers = {op: _guard(op, handler) for op, handler in self.handlers.items()}

    def heartbeat_worker(self, *, address: str, **kwargs: Any) -> Any:
        if address not in self.workers and address in self.removed:
            # A retired worker's last heartbeat, sent before it heard it was removed (it
            # closes on this answer): dask warns of an "unregistered worker", which every
            # scale-down and close here would print.
            return {"status": "missing"}
        return super().heartbeat_worker(address=address, **kwargs)


class _Removed(SchedulerPlugin):
    """The addresses of the workers the scheduler removed lately."""

    name = "golem-removed-workers"

    def __init__(self) -> None:
        self._recent: deque[str] = deque(maxlen=1024)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self._recent.append(worker)

    def __contains__(self, address: object) -> bool:
        return address in self._recent
