"""The requestor's session with its ``yagna`` daemon: REST calls, identity, allocation.

The daemon's address comes from ``YAGNA_API_URL`` (default ``http://127.0.0.1:7465``),
its app key from ``YAGNA_APPKEY`` (``yagna app-key create requestor`` makes one).  The
key goes only into the ``Authorization`` header: never into a log line, a repr or an
exception.

:class:`YagnaDaemon` is what the market and the payer share: one HTTP session, the
requestor's identity (its payment address), and the allocation that holds the
cluster's budget on the daemon (demands carry its decorations; accepting a debit note or
an invoice draws on it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from golem_dask import config
from golem_dask.errors import ConfigError, MarketError, NetworkError
from golem_dask.protocol.identity import checksum_address

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:7465"
#: Statuses a call accepts unless told otherwise.
OK = (200, 201, 204)


class YagnaError(MarketError):
    """The daemon answered a call with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def iso(moment: datetime) -> str:
    """A UTC time as the daemon writes it (RFC 3339, ``Z``).

    Examples
    --------
    >>> iso(datetime(2026, 12, 1, 17, 5, 13, 250000, tzinfo=UTC))
    '2026-12-01T17:05:13.250Z'
    """
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> datetime:
    return datetime.now(UTC)


def amount_text(amount: Decimal) -> str:
    """A token amount as the daemon's decimal strings: plain digits, never an exponent.

    Examples
    --------
    >>> amount_text(Decimal("1E-7")), amount_text(Decimal("2.50"))
    ('0.0000001', '2.5')
    """
    text = format(amount.normalize(), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".") or "0"


def _settings(url: str | None, app_key: str | None) -> tuple[str, str]:
    url = (url or os.environ.get("YAGNA_API_URL") or config.get("yagna.api-url") or DEFAULT_URL).rstrip("/")
    key = app_key or os.environ.get("YAGNA_APPKEY") or ""
    if not key:
        raise ConfigError("market='yagna' needs the daemon's app key in YAGNA_APPKEY; "
                          "make one with: yagna app-key create requestor")
    return url, key


def _unreachable(url: str, error: object) -> NetworkError:
    return NetworkError(f"no yagna daemon answers at {url} ({error}); start it with 'yagna service run' "
                        "or point YAGNA_API_URL at it")


def _refused_key(url: str) -> ConfigError:
    return ConfigError(f"the yagna daemon at {url} refused the app key in YAGNA_APPKEY; "
                       "list the valid ones with: yagna app-key list")


def whoami(url: str | None = None, app_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The checksummed identity the daemon holds for this app key (a blocking call, so a
    cluster with a wrong key or no daemon fails where it is made)."""
    url, key = _settings(url, app_key)
    request = urllib.request.Request(f"{url}/me", headers={"Authorization": f"Bearer {key}"})
    # The daemon is local or the user's own: never through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise _refused_key(url) from None
        raise YagnaError(f"yagna at {url}: GET /me answered {e.code}", e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(url, getattr(e, "reason", e)) from None
    return checksum_address(str(body["identity"]))


class YagnaApi:
    """REST calls to one daemon with one app key (aiohttp, started on the caller's loop)."""

    def __init__(self, url: str | None = None, app_key: str | None = None) -> None:
        self.url, self._key = _settings(url, app_key)
        self._session: Any = None

    def __repr__(self) -> str:
        return f"YagnaApi({self.url!r})"

    async def start(self) -> None:
        if self._session is not None:
            return
        try:
            import aiohttp
        except ImportError:  # pragma: no cover - aiohttp comes with the yagna extra
            raise ConfigError("market='yagna' needs aiohttp: pip install 'golem-dask[yagna]'") from None
        self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self._key}"}, trust_env=False)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def call(self, method: str, path: str, *, body: Any = None, params: Mapping[str, Any] | None = None,
                   timeout_s: float | None = None, ok: Iterable[int] = OK) -> Any:
        """``method path`` with a JSON ``body``; the decoded JSON answer (None if empty).

        Raises
        ------
        YagnaError
            On a status outside ``ok``, with the daemon's message.
        NetworkError
            If the daemon cannot be reached.
        """
        import aiohttp

        if self._session is None:
            raise NetworkError("the yagna session is closed")
        timeout = aiohttp.ClientTimeout(total=timeout_s if timeout_s is not None else config.seconds("yagna.call-timeout"))
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            async with self._session.request(method, self.url + path, json=body, params=query,
                                             timeout=timeout) as response:
                text = await response.text()
                status = response.status
        except TimeoutError:
            raise NetworkError(f"yagna at {self.url}: {method} {path} got no answer in {timeout.total:g}s") from None
        except aiohttp.ServerDisconnectedError:
            raise NetworkError(f"the yagna daemon at {self.url} closed the connection during {method} {path} "
                               "without answering; it may be stopping or have failed, and its log says why") from None
        except aiohttp.ClientError as e:
            raise _unreachable(self.url, e) from None
        if status == 401:
            raise _refused_key(self.url)
        if status not in tuple(ok):
            raise YagnaError(f"yagna: {method} {path} answered {status}: {_message(text)}", status)
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    async def websocket(self, path: str, timeout_s: float) -> Any:
        """An open websocket to ``path`` (aiohttp's), the app key sent as on every call.

        Raises
        ------
        NetworkError
            If the daemon cannot be reached or does not switch protocols within ``timeout_s``.
        """
        import aiohttp

        if self._session is None:
            raise NetworkError("the yagna session is closed")
        try:
            # yagna never answers a close frame: wait for it briefly.
            return await asyncio.wait_for(self._session.ws_connect(
                self.url + path, timeout=aiohttp.ClientWSTimeout(ws_close=1.0), max_msg_size=0), timeout_s)
        except TimeoutError:
            raise NetworkError(f"yagna at {self.url}: no tunnel at {path} within {timeout_s:g}s") from None
        except aiohttp.WSServerHandshakeError as e:
            raise NetworkError(f"yagna at {self.url}: {path} answered {e.status}: {e.message}") from None
        except aiohttp.ClientError as e:
            raise _unreachable(self.url, e) from None


def _message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:300]
    return text[:300]


class YagnaDaemon:
    """What the yagna market and payer share: the session, the identity, the allocation.

    Parameters
    ----------
    budget:
        The allocation's total (the cluster's budget), in the platform's token.
    platform:
        The payment platform, e.g. ``erc20-hoodi-tglm`` (a testnet) or
        ``erc20-polygon-glm`` (GLM on Polygon).
    url, app_key:
        The daemon, if not from ``YAGNA_API_URL`` / ``YAGNA_APPKEY``.
    """

    def __init__(self, budget: Decimal, platform: str, url: str | None = None, app_key: str | None = None) -> None:
        self.api = YagnaApi(url, app_key)
        self.budget = budget
        self.platform = platform
        self.identity = whoami(self.api.url, self.api._key)
        self._allocation: str | None = None
        self._allocation_until = utc_now()
        self._lock = asyncio.Lock()
        self._users = 0
        #: Activities per agreement (the daemon's payments name activities, not agreements).
        self.activities: dict[str, list[str]] = {}
        #: When this session began: payments and events before it are not ours.
        self.since = utc_now() - timedelta(seconds=1)
        #: The daemon answered that it cannot run its payment cycle on request.
        self.cycle_unsupported = False
        self._cycled_at = -1.0

    def __repr__(self) -> str:
        return f"YagnaDaemon({self.api.url!r}, identity={self.identity}, platform={self.platform!r})"

    async def start(self) -> None:
        """Open the session (the market and the payer each call this; :meth:`close` as often)."""
        self._users += 1
        await self.api.start()

    async def close(self) -> None:
        """Release the allocation and close the session once its last user closes."""
        self._users -= 1
        if self._users > 0:
            return
        allocation, self._allocation = self._allocation, None
        if allocation is not None:
            try:
                await self.api.call("DELETE", f"/payment-api/v1/allocations/{allocation}", ok=(*OK, 404, 410))
            except MarketError as e:
                logger.warning("could not release allocation %s: %s", allocation, e)
        await self.api.close()

    async def allocation(self) -> str:
        """The allocation holding the budget, made on first use, and extended by another
        ``golem.yagna.allocation-lifetime`` once half of it has passed: the daemon releases
        an expired allocation, and then accepts nothing more from it."""
        async with self._lock:
            lifetime = timedelta(seconds=config.seconds("yagna.allocation-lifetime"))
            if self._allocation is None:
                made = await self.api.call("POST", "/payment-api/v1/allocations", body={
                    "totalAmount": amount_text(self.budget),
                    "paymentPlatform": self.platform,
                    "address": self.identity.lower(),
                    "timeout": iso(utc_now() + lifetime),
                    "makeDeposit": False,
                })
                self._allocation, self._allocation_until = str(made["allocationId"]), utc_now() + lifetime
                logger.info("allocation %s: %s on %s", self._allocation, self.budget, self.platform)
            elif self._allocation_until - utc_now() < lifetime / 2:
                until = utc_now() + lifetime
                try:
                    await self.api.call("PUT", f"/payment-api/v1/allocations/{self._allocation}",
                                        body={"timeout": iso(until)})
                    self._allocation_until = until
                    logger.info("allocation %s extended to %s", self._allocation, iso(until))
                except MarketError as e:
                    logger.warning("could not extend allocation %s: %s", self._allocation, e)
            return self._allocation

    async def decorations(self) -> tuple[dict[str, Any], list[str]]:
        """The allocation's demand decorations: properties and constraints every demand carries."""
        allocation = await self.allocation()
        found = await self.api.call("GET", "/payment-api/v1/demandDecorations", params={"allocationIds": allocation})
        props = {str(p["key"]): p["value"] for p in found.get("properties", [])}
        return props, [str(c) for c in found.get("constraints", [])]

    async def run_cycle(self) -> None:
        """Pay what is accepted now instead of at the next batch cycle (24 h on mainnet);
        at most every 200 ms, however many agreements are settling."""
        now = asyncio.get_running_loop().time()
        if self.cycle_unsupported or now - self._cycled_at < 0.2:
            return
        self._cycled_at = now
        try:
            logger.debug("running the payment cycle of %s", self.platform)
            await self.api.call("POST", f"/payment-api/v1/batchCycle/{self.platform}/now", ok=OK)
        except YagnaError as e:
            if e.status in (404, 405, 501):
                self.cycle_unsupported = True
                logger.warning("this yagna daemon cannot run its payment cycle on request (%s); payments wait "
                               "for its next cycle", e)
            else:
                logger.info("running the payment cycle: %s", e)
