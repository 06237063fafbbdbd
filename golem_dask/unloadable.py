"""Loaded into every worker (``dask worker --preload``, this file's source as text): a task
that names a module or object the worker's environment lacks fails as that task's error.

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


install()
