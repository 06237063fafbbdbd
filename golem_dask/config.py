"""Register golem-dask's defaults (``golem.yaml``) with ``dask.config``.

Every key can be overridden the Dask way: in a YAML file under ``~/.config/dask``, with
``dask.config.set({"golem.payment.budget": "10"})``, or with an environment variable such
as ``DASK_GOLEM__PAYMENT__BUDGET=10``.
"""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from typing import Any

import dask.config
import dask.utils
import yaml

from golem_dask.errors import ConfigError

_FN = os.path.join(os.path.dirname(__file__), "golem.yaml")

with open(_FN) as _f:
    defaults = yaml.safe_load(_f)

dask.config.update_defaults(defaults)


def get(key: str, override: Any = None) -> Any:
    """Read ``golem.<key>`` unless the caller passed an explicit ``override``.

    Examples
    --------
    >>> get("payment.platform")
    'erc20-devnet-glm'
    """
    return dask.config.get(f"golem.{key}", override_with=override)


def data_dir() -> str:
    """The requestor's data folder, ``golem.payment.data-dir`` with ``~`` expanded: its
    ledger, what it remembers of providers, the list of its running clusters."""
    return os.path.expanduser(get("payment.data-dir"))


def ledger_path() -> str:
    """Where the durable ledger lives: ``<golem.payment.data-dir>/ledger.sqlite``."""
    return os.path.join(data_dir(), "ledger.sqlite")


def seconds(key: str, override: Any = None) -> float:
    """Read a duration (``"30s"``, ``"1h"``, a number of seconds) as float seconds."""
    value = get(key, override)
    try:
        return float(dask.utils.parse_timedelta(value, default="s"))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"golem.{key}={value!r} is not a duration; use e.g. '30s' or '2m'"
        ) from e


def decimal(key: str, override: Any = None, name: str | None = None) -> Decimal | None:
    """Read a token amount or ratio as ``Decimal`` (``None`` stays ``None``).

    ``name`` is the keyword argument that carried ``override``, for error messages.
    """
    value = get(key, override)
    return to_decimal(value, name if override is not None and name else f"golem.{key}")


def to_decimal(value: Any, what: str) -> Decimal | None:
    """Convert a user-given amount to ``Decimal``, naming ``what`` on failure."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what}={value!r} is not an amount")
    if isinstance(value, float):
        # YAML and env vars give floats for plain numbers; repr() is the shortest
        # decimal that round-trips, which is what the user typed.
        value = repr(value)
    try:
        result = Decimal(value)
    except (InvalidOperation, TypeError, ValueError) as e:
        raise ConfigError(f"{what}={value!r} is not an amount; use a string like '0.5'") from e
    if not result.is_finite() or result < 0:
        raise ConfigError(f"{what}={value!r} must be a finite amount >= 0")
    return result


def address(key: str, override: Any = None) -> str | None:
    """An Ethereum address from config.

    ``DASK_GOLEM__...`` environment variables are parsed as Python literals, which turns
    ``0x5FbD...`` into an int; this turns it back.
    """
    value = get(key, override)
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return f"0x{value:040x}"
    return str(value)


def byte_size(value: Any, what: str) -> int:
    """Parse ``"4GiB"`` / ``4e9`` / ``4294967296`` into bytes."""
    try:
        return int(dask.utils.parse_bytes(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}={value!r} is not a size; use e.g. '4GiB'") from e
