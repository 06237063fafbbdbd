"""A real Golem ``yagna`` daemon for tests, offline, settling payments on a local anvil chain.

:class:`YagnaStack` brings up, in a temporary directory it owns:

* an anvil chain with chain id 560048, which yagna 0.17.6 takes for its default test
  network "hoodi", holding golem-dask's ERC-20 token (symbol tGLM);
* one ``yagna service run`` daemon on loopback ports of its own (REST API and GSB router),
  on a "central" net served by its own GSB router, so nothing leaves the machine;
* two identities in that daemon: the requestor (its default identity, from a fresh secret,
  funded with ETH and tokens on anvil) and a provider (created through the CLI), each with
  its own app key.

The daemon is the PyPI package ``golem-node`` (in the ``test`` extra).  Without it the tests
that use the stack skip; with ``GOLEM_DASK_REQUIRE_YAGNA=1`` (set by CI) they fail instead.
anvil is found as in :mod:`anvil_support`.

Use the module fixture by importing it into a test module::

    from yagna_stack import subnet, yagna_stack  # noqa: F401

    def test_something(yagna_stack):
        session = yagna_stack.session(yagna_stack.requestor_key)
        session.get(f"{yagna_stack.api_url}/me", timeout=10).raise_for_status()

Facts about yagna 0.17.6 this module relies on:

* it never writes ``config-payments.toml``; a file in the data directory with ``[engine]``
  and ``[chain.hoodi]`` replaces the built-in one.  Pointing the built-in hoodi chain at
  anvil through ``HOODI_*`` variables is not enough: its wrapper contract does not exist on
  anvil and allocations then fail with HTTP 500;
* identities created after the daemon started get no bus messages, so the daemon is
  restarted once the provider identity exists;
* the payment process interval is at least 5 s;
* it reads a ``.env`` file from its working directory, so every call runs in the stack's
  own directory;
* it shuts down cleanly on SIGINT.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import weakref
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import psutil
import pytest
import requests
from anvil_support import anvil_binary

from golem_dask.chain.anvil import AnvilNode, _read_from
from golem_dask.chain.deploy import deploy_contracts, fund, token_contract
from golem_dask.protocol.identity import Wallet, checksum_address

if TYPE_CHECKING:
    from web3 import Web3

__all__ = [
    "CHAIN_ID",
    "NETWORK",
    "PLATFORM",
    "YagnaStack",
    "YagnaStackError",
    "http_session",
    "subnet",
    "yagna_binary",
    "yagna_stack",
]

REQUIRED = os.environ.get("GOLEM_DASK_REQUIRE_YAGNA") == "1"

#: yagna 0.17.6's default test network; anvil stands in for it with the same chain id.
NETWORK = "hoodi"
CHAIN_ID = 560048
PLATFORM = f"erc20-{NETWORK}-tglm"
TOKEN_SYMBOL = "tGLM"

#: What the requestor is given on anvil: tokens to pay with, ETH for gas.
FUND_TOKENS = Decimal(1000)
FUND_ETH_WEI = 100 * 10**18

#: Seconds for the REST API to answer after ``yagna service run``.
START_TIMEOUT_S = 120.0
#: Seconds yagna is given to exit after each of SIGINT and SIGTERM, before the next signal.
STOP_TIMEOUT_S = 20.0
#: Seconds for one ``yagna`` CLI command.
CLI_TIMEOUT_S = 60.0
#: Seconds for one HTTP request to yagna or anvil.
HTTP_TIMEOUT_S = 30.0
#: How often the requestor's payments are sent; 5 s is the least yagna 0.17.6 accepts.
PAYMENT_INTERVAL = "6s"
#: Tries with fresh ports when a picked port is taken before yagna binds it.
_PORT_ATTEMPTS = 3

_INSTALL_HINT = "pip install golem-node==0.17.6 (it is in golem-dask's test extra: pip install -e '.[test]')"

#: Inherited variables that would point our daemon or CLI at another yagna, or send
#: loopback traffic through a proxy.
_DROPPED_PREFIXES = ("YAGNA_", "GSB_", "YA_", "CENTRAL_NET_", "HOODI_")


class YagnaStackError(RuntimeError):
    """The stack could not be started, queried or stopped; the message says what happened."""


class _PortTaken(YagnaStackError):
    """yagna exited because a port picked for it was taken in the meantime."""


def yagna_binary() -> Path:
    """The ``yagna`` binary: the one installed next to this Python, else the first on ``PATH``.

    Skips the calling test when there is none, or fails it with ``GOLEM_DASK_REQUIRE_YAGNA=1``.
    """
    beside = Path(sys.executable).parent / "yagna"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("yagna")
    if found is not None:
        return Path(found)
    message = f"the yagna daemon is not installed: {_INSTALL_HINT}"
    if REQUIRED:
        pytest.fail(f"{message} (GOLEM_DASK_REQUIRE_YAGNA=1)")
    pytest.skip(message)


def subnet() -> str:
    """A fresh subnet name, so that a test's offers and demands meet no other test's."""
    return f"t-{secrets.token_hex(6)}"


def clean_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without proxy settings and without another yagna's settings."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name.lower().endswith("_proxy") or name.startswith(_DROPPED_PREFIXES):
            del env[name]
    return env


def http_session(app_key: str | None = None) -> requests.Session:
    """A ``requests`` session for loopback services: no proxy from the environment,
    and ``Authorization: Bearer <app_key>`` when a key is given."""
    session = requests.Session()
    session.trust_env = False
    if app_key is not None:
        session.headers["Authorization"] = f"Bearer {app_key}"
    return session


def _free_port(below: int | None = None) -> int:
    """A loopback TCP port nobody listens on now: any (port 0), or a random one under ``below``."""
    for _ in range(1000):
        port = 0 if below is None else secrets.choice(range(2000, below))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise YagnaStackError(f"no free loopback port under {below}")


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(_read_from(path, 0).splitlines()[-lines:]) or f"(nothing in {path})"


def payments_config(token: str, rpc_url: str) -> str:
    """The ``config-payments.toml`` that points yagna's hoodi chain at ``rpc_url`` and ``token``.

    Short engine intervals: due transfers are gathered into a transaction every second (the
    engine's shortest), and its receipt is looked for at once after sending, since anvil
    mines each transaction as it arrives (with the 1 s of yagna's examples, closing with
    settlement took 0.5-1 s longer for nothing); no confirmations to wait for; and a head
    block that may be years old, since anvil mines only when there is a transaction.
    """
    return f"""\
[engine]
process-interval = 1
process-interval-after-send = 0
process-interval-after-error = 2
process-interval-after-no-gas-or-token-start = 2
process-interval-after-no-gas-or-token-max = 10
process-interval-after-no-gas-or-token-increase = 1.5
report-alive-interval = 2
gather-interval = 1
gather-at-start = true
automatic-recover = false
ignore-deadlines = false

[chain.{NETWORK}]
chain-name = "Hoodi (local anvil)"
chain-id = {CHAIN_ID}
currency-symbol = "tETH"
priority-fee = 0.000001
max-fee-per-gas = 20.0
transaction-timeout = 100
token = {{ address = "{token}", symbol = "{TOKEN_SYMBOL}" }}
confirmation-blocks = 0
block-explorer-url = "http://127.0.0.1/"
external-source-check-interval = 300

[[chain.{NETWORK}.rpc-endpoints]]
names = "local-anvil"
endpoints = "{rpc_url}"
priority = 0
max-timeout-ms = 5000
verify-interval-secs = 60
allowed-head-behind-secs = 315360000
"""


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Resources:
    """What a :class:`YagnaStack` owns: the daemon, anvil and the temporary directory.

    Kept apart from the stack so that a :func:`weakref.finalize` can release them at
    interpreter exit without keeping the stack alive.
    """

    def __init__(self) -> None:
        self.daemon: subprocess.Popen[bytes] | None = None
        self.anvil: AnvilNode | None = None
        self.root: Path | None = None

    def stop_daemon(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL, each given :data:`STOP_TIMEOUT_S`.

        Raises :class:`YagnaStackError` if a process the daemon started outlives it (it is
        killed first).
        """
        proc, self.daemon = self.daemon, None
        if proc is None:
            return
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        survivors = [p for p in descendants if _alive(p)]
        for p in survivors:
            try:
                p.kill()
            except psutil.Error:
                pass
        if survivors:
            raise YagnaStackError(f"yagna (pid {proc.pid}) left processes behind, now killed: "
                                  f"{[p.pid for p in survivors]}")

    def close(self) -> None:
        try:
            self.stop_daemon()
        finally:
            anvil, self.anvil = self.anvil, None
            try:
                if anvil is not None:
                    anvil.close()
            finally:
                root, self.root = self.root, None
                if root is not None:
                    shutil.rmtree(root, ignore_errors=True)


class YagnaStack:
    """anvil and one ``yagna`` daemon holding a funded requestor and a provider identity.

    :meth:`start` brings everything up (2-3 s); :meth:`close` stops the daemon and anvil
    and removes the temporary directory.  The attributes below are set by :meth:`start`.

    Attributes
    ----------
    api_url:
        The REST API, ``http://127.0.0.1:<port>``.
    requestor_key, provider_key:
        App keys of the two identities (bearer tokens for the REST API).
    requestor_id, provider_id:
        Their node ids, checksummed addresses.
    platform, network:
        ``"erc20-hoodi-tglm"`` and ``"hoodi"``.
    token:
        Checksummed address of the tGLM token on anvil.
    anvil:
        The :class:`~golem_dask.chain.anvil.AnvilNode`; ``anvil.accounts[0]`` deployed the
        token and may mint it.
    root, datadir, log_path:
        The stack's temporary directory, yagna's data directory and yagna's log in it.

    Examples
    --------
    ::

        with YagnaStack() as stack:
            s = stack.session(stack.requestor_key)
            s.get(f"{stack.api_url}/me", timeout=10).json()["identity"]
            stack.token_balance(stack.provider_id)
    """

    platform = PLATFORM
    network = NETWORK

    def __init__(self, *, fund_tokens: Decimal = FUND_TOKENS) -> None:
        self.fund_tokens = Decimal(fund_tokens)
        self.api_url = ""
        self.gsb_url = ""
        self.requestor_key = ""
        self.requestor_id = ""
        self.provider_key = ""
        self.provider_id = ""
        self.token = ""
        self.binary: Path | None = None
        self.root: Path | None = None
        self.datadir: Path | None = None
        self.log_path: Path | None = None
        self._secret = ""
        self._web3: Web3 | None = None
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.close)

    # --- lifecycle ----------------------------------------------------------------

    @property
    def anvil(self) -> AnvilNode:
        """The anvil node the daemon settles on."""
        if self._resources.anvil is None:
            raise YagnaStackError("the stack is not running")
        return self._resources.anvil

    @property
    def pid(self) -> int | None:
        """PID of the running daemon, ``None`` when it is stopped."""
        proc = self._resources.daemon
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> Self:
        """Bring up anvil and the daemon with both identities and payments initialised.

        Whatever was started is stopped again if a step fails.  Returns ``self``.
        """
        if self.root is not None:
            return self
        if not self._finalizer.alive:
            raise YagnaStackError("the stack was closed; make a new YagnaStack")
        self.binary = yagna_binary()
        anvil_path = anvil_binary()
        try:
            self._start(anvil_path)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, anvil_path: Path) -> None:
        self.root = self._resources.root = Path(tempfile.mkdtemp(prefix="golem-dask-yagna-"))
        self.datadir = self.root / "yagna"
        self.datadir.mkdir()
        self.log_path = self.root / "yagna.log"

        node = self._resources.anvil = AnvilNode(binary=anvil_path, chain_id=CHAIN_ID, persist_state=False,
                                                 state_dir=self.root / "anvil")
        node.start()
        w3 = self._connect()
        node.contracts = deploy_contracts(w3, node.accounts[0])
        token = node.contracts["token"]
        assert token is not None
        self.token = token
        self._secret = secrets.token_hex(32)
        self.requestor_id = Wallet.from_key(self._secret).address
        self.requestor_key = secrets.token_hex(16)
        fund(w3, self.token, node.accounts[0], self.requestor_id, self.fund_tokens, FUND_ETH_WEI)
        self._write_payments_config()

        # A port picked here may be taken before yagna binds it; then pick others.
        for attempt in range(_PORT_ATTEMPTS):
            self.api_url = f"http://127.0.0.1:{_free_port()}"
            # The GSB router also serves as the central net, and yagna 0.17.6 reads at most four
            # port digits in CENTRAL_NET_HOST: a larger port reads as "host not found".
            self.gsb_url = f"tcp://127.0.0.1:{_free_port(below=10_000)}"
            try:
                self._start_daemon()
                break
            except _PortTaken:
                if attempt + 1 == _PORT_ATTEMPTS:
                    raise
        me = self._get(self.requestor_key, "/me")
        if checksum_address(me["identity"]) != self.requestor_id:
            raise YagnaStackError(f"yagna's default identity is {me['identity']}, not the requestor "
                                  f"{self.requestor_id} made from YAGNA_AUTOCONF_ID_SECRET")

        created = json.loads(self.cli("--json", "id", "create", "--no-password", "provider"))
        self.provider_id = checksum_address(created["Ok"]["nodeId"])
        self.provider_key = self.cli("app-key", "create", "--id", self.provider_id.lower(), "provider",
                                     quiet=True).strip()
        if not self.provider_key:
            raise YagnaStackError("`yagna app-key create` printed no key for the provider")
        # The daemon routes bus messages only to identities it knew when it started.
        self.restart()

        try:
            status = json.loads(self.cli("--json", "payment", "status", "--network", NETWORK))
        except YagnaStackError as e:
            raise YagnaStackError(f"yagna cannot read the requestor's {TOKEN_SYMBOL} balance on {self.anvil.url}: "
                                  f"is {self.datadir / 'config-payments.toml'} in effect? {e}") from None
        if Decimal(status["amount"]) != self.fund_tokens:
            raise YagnaStackError(
                f"yagna sees {status['amount']} {TOKEN_SYMBOL} for the requestor {self.requestor_id}, expected "
                f"{self.fund_tokens}: is {self.datadir / 'config-payments.toml'} in effect? "
                f"yagna's log ends:\n{_tail(self.log_path)}")

    def _write_payments_config(self) -> None:
        assert self.datadir is not None
        text = payments_config(self.token, self.anvil.url)
        chain = tomllib.loads(text)["chain"][NETWORK]
        if (chain["chain-id"], chain["token"]["address"], chain["rpc-endpoints"][0]["endpoints"]) != (
                CHAIN_ID, self.token, self.anvil.url):
            raise YagnaStackError(f"config-payments.toml does not read back as written:\n{text}")
        (self.datadir / "config-payments.toml").write_text(text)

    def _start_daemon(self) -> None:
        assert self.binary is not None and self.root is not None and self.log_path is not None
        env = self.env()
        env.update({
            "YAGNA_AUTOCONF_ID_SECRET": self._secret,
            "YAGNA_AUTOCONF_APPKEY": self.requestor_key,
            # A test process serving an exe-unit over the GSB API sends no usage reports;
            # without these yagna destroys its activity after 10 s.
            "UNRESPONSIVE_LIMIT_SECONDS": "3600",
            "INACTIVITY_LIMIT_SECONDS": "7200",
        })
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(b"\n$ yagna service run\n")
            log.flush()
            # Own session: a Ctrl-C meant for pytest reaches the daemon only through close().
            self._resources.daemon = subprocess.Popen(
                [str(self.binary), "service", "run"], env=env, cwd=self.root, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        proc = self._resources.daemon
        session = http_session(self.requestor_key)
        deadline = time.monotonic() + START_TIMEOUT_S
        with session:
            while True:
                if proc.poll() is not None:
                    self._resources.daemon = None
                    if "address already in use" in _read_from(self.log_path, log_start).lower():
                        raise _PortTaken(f"{self.api_url} or {self.gsb_url} is taken")
                    raise YagnaStackError(f"yagna exited with code {proc.returncode} while starting; "
                                          f"its log ends:\n{_tail(self.log_path)}")
                try:
                    if session.get(f"{self.api_url}/me", timeout=2).status_code == 200:
                        return
                except requests.RequestException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise YagnaStackError(f"yagna (pid {proc.pid}) did not answer GET {self.api_url}/me within "
                                          f"{START_TIMEOUT_S:.0f} s; its log ends:\n{_tail(self.log_path)}")
                time.sleep(0.1)

    def _init_payments(self) -> None:
        self.cli("payment", "init", "--sender", "--network", NETWORK)
        self.cli("payment", "init", "--receiver", "--network", NETWORK, "--account", self.provider_id.lower())
        self.cli("payment", "process", "set", "--network", NETWORK, "--interval", PAYMENT_INTERVAL)

    def restart(self) -> Self:
        """Stop the daemon and start it again on the same ports and data; anvil keeps running."""
        if self.root is None:
            raise YagnaStackError("restart() needs a started stack")
        self._resources.stop_daemon()
        self._start_daemon()
        self._init_payments()
        return self

    def close(self) -> None:
        """Stop yagna (SIGINT, then SIGTERM and SIGKILL if it lingers), stop anvil, remove the
        temporary directory.  Safe to call twice, and after a failed :meth:`start`."""
        self._web3 = None
        self.root = self.datadir = self.log_path = None
        self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.root is None:
            return "YagnaStack(stopped)"
        anvil = self._resources.anvil
        return (f"YagnaStack(api_url={self.api_url!r}, requestor_id={self.requestor_id!r}, "
                f"provider_id={self.provider_id!r}, pid={self.pid}, rpc={anvil.url if anvil else None!r})")

    # --- using it -----------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment for a ``yagna`` CLI call against this daemon (no keys in it).

        The current environment without proxy settings or another yagna's settings, plus the
        data directory, API and GSB addresses, net and payment network.
        """
        if self.datadir is None:
            raise YagnaStackError("the stack is not running")
        env = clean_environ()
        env.update({
            "YAGNA_DATADIR": str(self.datadir),
            "YAGNA_API_URL": self.api_url,
            "GSB_URL": self.gsb_url,
            "YA_NET_TYPE": "central",
            "CENTRAL_NET_HOST": self.gsb_url.removeprefix("tcp://"),
            "YA_PAYMENT_NETWORK": NETWORK,
        })
        return env

    def cli(self, *args: str, quiet: bool = False) -> str:
        """Run ``yagna *args`` against this daemon and return its standard output.

        With ``quiet``, a failure's message leaves the output out (it may hold a key).
        """
        assert self.binary is not None
        try:
            done = subprocess.run([str(self.binary), *args], check=False, env=self.env(), cwd=self.root, capture_output=True,
                                  text=True, timeout=CLI_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise YagnaStackError(f"`yagna {' '.join(args)}` did not finish within {CLI_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            # The first lines say what failed; a Rust backtrace may follow.
            shown = "" if quiet else f":\n{done.stderr.strip()[:1500]}\n{done.stdout.strip()[:500]}"
            raise YagnaStackError(f"`yagna {' '.join(args)}` exited with code {done.returncode}{shown}")
        return done.stdout

    def session(self, app_key: str) -> requests.Session:
        """A ``requests`` session for the REST API as the identity of ``app_key`` (no proxy)."""
        return http_session(app_key)

    def _get(self, app_key: str, path: str) -> Any:
        with self.session(app_key) as s:
            response = s.get(f"{self.api_url}{path}", timeout=HTTP_TIMEOUT_S)
        if response.status_code != 200:
            raise YagnaStackError(f"GET {path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def _connect(self) -> Web3:
        if self._web3 is None:
            from web3 import HTTPProvider, Web3

            self._web3 = Web3(HTTPProvider(self.anvil.url, request_kwargs={"timeout": HTTP_TIMEOUT_S},
                                           session=http_session()))
        return self._web3

    def web3(self) -> Web3:
        """A ``web3.Web3`` on the stack's anvil, bypassing any proxy in the environment."""
        return self._connect()

    def token_balance(self, address: str) -> int:
        """``address``'s tGLM balance on anvil, in wei."""
        contract = token_contract(self._connect(), self.token)
        return int(contract.functions.balanceOf(checksum_address(address)).call())


@pytest.fixture(scope="module")
def yagna_stack() -> Iterator[YagnaStack]:
    """One :class:`YagnaStack` for each test module that imports this fixture (a start costs
    2-3 s), stopped when the module's tests are done.

    Tests share its identities and funds: use :func:`subnet` for offers and demands, and
    compare balances before and after rather than with fixed amounts.
    """
    with YagnaStack() as stack:
        yield stack
