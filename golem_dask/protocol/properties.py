"""Golem property names and typed helpers.

Properties are a flat mapping of dotted names to values (numbers, strings, booleans,
lists).  Offers describe a provider's node and prices; demands describe what the
requestor needs.  Only names used by golem-dask are listed; any other name passes
through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import Any

# Node and resources.
NODE_NAME = "golem.node.id.name"
#: The provider's secp256k1 public key (hex, compressed); it hashes to its address.
NODE_PUBKEY = "golem.node.id.pubkey"
CPU_THREADS = "golem.inf.cpu.threads"
MEM_GIB = "golem.inf.mem.gib"
STORAGE_GIB = "golem.inf.storage.gib"
RUNTIME_NAME = "golem.runtime.name"

# Service.
EXPIRATION = "golem.srv.comp.expiration"  # milliseconds since the epoch
IMAGE = "golem.srv.comp.task_package"
#: JSON of the Python, dask and distributed versions the requestor runs (a worker image must match).
DASK_VERSIONS = "golem.srv.comp.dask.versions"

# Commercial terms.
PRICING_MODEL = "golem.com.pricing.model"
LINEAR_COEFFS = "golem.com.pricing.model.linear.coeffs"
USAGE_VECTOR = "golem.com.usage.vector"
SCHEME = "golem.com.scheme"
DEBIT_NOTE_INTERVAL = "golem.com.scheme.payu.debit-note.interval-sec"
#: How often the requestor pays accepted debit notes mid-agreement (Golem's payu term).
PAYMENT_TIMEOUT = "golem.com.scheme.payu.payment-timeout-sec?"
CHOSEN_PLATFORM = "golem.com.payment.chosen-platform"

# Usage counters.
USAGE_CPU_SEC = "golem.usage.cpu_sec"
USAGE_DURATION_SEC = "golem.usage.duration_sec"


def payment_address(platform: str) -> str:
    """The property holding a party's address on ``platform``.

    Examples
    --------
    >>> payment_address("erc20-devnet-glm")
    'golem.com.payment.platform.erc20-devnet-glm.address'
    """
    return f"golem.com.payment.platform.{platform}.address"


def freeze(props: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy of ``props`` with lists turned into tuples."""
    return MappingProxyType(
        {k: tuple(v) if isinstance(v, list) else v for k, v in sorted(props.items())}
    )


def gib(nbytes: int) -> Decimal:
    """Bytes as a ``Decimal`` number of GiB (exact: GiB are powers of two)."""
    return (Decimal(nbytes) / Decimal(2**30)).normalize()


def gib_to_bytes(value: Any) -> int:
    """A GiB property value as whole bytes."""
    return int(Decimal(str(value)) * 2**30)


@dataclass(frozen=True, slots=True)
class Resources:
    """What one agreement rents: threads, memory and disk."""

    cpu_threads: int
    memory_bytes: int
    storage_bytes: int

    @property
    def memory_gib(self) -> Decimal:
        return gib(self.memory_bytes)

    @property
    def storage_gib(self) -> Decimal:
        return gib(self.storage_bytes)

    def to_properties(self) -> dict[str, Any]:
        return {CPU_THREADS: self.cpu_threads, MEM_GIB: self.memory_gib, STORAGE_GIB: self.storage_gib}

    @classmethod
    def from_properties(cls, props: Mapping[str, Any]) -> Resources:
        """Read the slice a demand asks for (or an offer has free)."""
        return cls(
            cpu_threads=int(props[CPU_THREADS]),
            memory_bytes=gib_to_bytes(props[MEM_GIB]),
            storage_bytes=gib_to_bytes(props.get(STORAGE_GIB, 0)),
        )

    def fits_in(self, other: Resources) -> bool:
        return (
            self.cpu_threads <= other.cpu_threads
            and self.memory_bytes <= other.memory_bytes
            and self.storage_bytes <= other.storage_bytes
        )

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_threads + other.cpu_threads,
            self.memory_bytes + other.memory_bytes,
            self.storage_bytes + other.storage_bytes,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu_threads - other.cpu_threads,
            self.memory_bytes - other.memory_bytes,
            self.storage_bytes - other.storage_bytes,
        )
