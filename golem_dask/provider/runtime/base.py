"""The ``Runtime`` seam: how a provider runs an activity.

A :class:`Runtime` belongs to a provider agent and makes one :class:`RuntimeActivity`
per activity.  The activity follows Golem's exe-script: ``deploy`` (get the image or
environment ready), ``start`` (create the sandbox), ``run`` (the long-running ``dask
worker``), ``transfer`` (files in or out) and ``terminate`` (always, also after a
failure).  Backends: ``process`` (a child process, no engine needed) and ``docker``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from golem_dask.protocol.properties import Resources


class RuntimeActivity(abc.ABC):
    """One activity's sandbox on the provider."""

    def __init__(self, activity_id: str, agreement_id: str, resources: Resources) -> None:
        self.activity_id = activity_id
        self.agreement_id = agreement_id
        self.resources = resources

    @abc.abstractmethod
    async def deploy(self) -> str:
        """Make the image or environment ready; returns a line for the activity log."""

    @abc.abstractmethod
    async def start(self) -> str:
        """Create the sandbox with the agreed limits."""

    @abc.abstractmethod
    async def run(self, entry_point: str, args: Sequence[str], env: Mapping[str, str]) -> str:
        """Start the long-running command; returns once it runs."""

    @abc.abstractmethod
    async def transfer(self, source: str, destination: str) -> str:
        """Copy a file in or out of the sandbox."""

    @abc.abstractmethod
    async def cpu_seconds(self) -> Decimal:
        """CPU time the activity used so far, as measured by the OS or the engine."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait until the command run by ``run`` exits; returns its exit code."""

    @abc.abstractmethod
    async def terminate(self) -> None:
        """Stop everything and free the sandbox.  Safe to call twice."""

    def logs(self) -> str:
        """What the command printed so far (for error messages)."""
        return ""


class Runtime(abc.ABC):
    """A provider's way of running activities."""

    #: Value of ``golem.runtime.name`` in the provider's offers.
    name: str

    def properties(self) -> dict[str, Any]:
        """Extra offer properties describing this runtime."""
        return {}

    @abc.abstractmethod
    def activity(self, activity_id: str, agreement_id: str, resources: Resources) -> RuntimeActivity:
        """A new, not yet deployed activity sandbox."""

    async def cleanup(self, live_agreement_ids: set[str]) -> int:
        """Remove sandboxes left by agreements that are no longer live; returns how many."""
        return 0
