"""Loaded into every worker (``dask worker --preload``, this file's source as text).

A task that names a module or object the worker's environment lacks fails as that task's
error; and on a rented worker (one holding a worker certificate of the cluster) a task that
opens a client (``get_client``, ``worker_client``, joblib's Dask backend, dask's Event,
Lock and Actor) fails at once with the reason, rather than timing out against the
scheduler, which refuses a worker certificate every client operation.

Without it, the worker dies while reading the message that carries the task (distributed
unpickles it in the comm), the scheduler sends the task to the next worker, which dies too,
and a cluster that replaces lost workers rents one after another for the same missing
package.  With it, what cannot be found is unpickled as a stand-in that raises
``ModuleNotFoundError`` (naming the module) when the task calls it.  The normal path is
untouched: only a load that already failed is tried again this way.

The worker image holds none of golem-dask, so this file imports only the standard library
and distributed.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import distributed.protocol.pickle as dask_pickle

HINT = "the worker's environment lacks it ('golem-dask image build' puts this client's packages in the worker image)"


def missing(module: str, name: str, error: Exception) -> type:
    """A class standing in for ``module.name``: calling it, or using an object of it, raises."""
    message = f"{error}: {HINT}"
    kind = ModuleNotFoundError if isinstance(error, ModuleNotFoundError) else ImportError

    class Missing(type):
        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            raise kind(message)

    def attribute(self: Any, attr: str) -> Any:
        if attr.startswith("__"):  # pickle looks for __setstate__ and friends while loading
            raise AttributeError(attr)
        raise kind(message)

    return Missing(name, (), {"__module__": module, "__getattr__": attribute})


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as e:
            return missing(module, name, e)


def install() -> None:
    original = dask_pickle.loads
    if getattr(original, "golem_unloadable", False):
        return

    def loads(x: Any, *, buffers: Any = ()) -> Any:
        try:
            return original(x, buffers=buffers)
        except (ImportError, AttributeError):
            return Unpickler(io.BytesIO(x), buffers=buffers or None).load()

    loads.golem_unloadable = True  # type: ignore[attr-defined]
    dask_pickle.loads = loads


#: Why a rented worker opens no client.
REFUSAL = ("workers rented from strangers may not act as clients (get_client, worker_client, joblib's Dask "
           "backend): the scheduler refuses their certificates; submit tasks from the client instead")


def dask_setup(worker: Any) -> None:
    """On a worker with a worker certificate, opening a client raises PermissionError."""
    if not getattr(getattr(worker, "security", None), "tls_worker_cert", None):
        return  # a worker of this machine, without TLS roles: clients are allowed

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(REFUSAL)

    worker._get_client = refuse


install()
