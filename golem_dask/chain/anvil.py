"""A real Ethereum node for tests and local runs: anvil, started as a child process.

The embedded :class:`~golem_dask.chain.devnet.Devnet` runs py-evm inside the
requestor; :class:`AnvilNode` instead runs `anvil <https://getfoundry.sh/anvil>`_, a
standalone node that speaks JSON-RPC over HTTP like a public chain does.  Code that
talks to it goes through the same network stack (``web3.HTTPProvider``, raw signed
transactions, receipts polled over HTTP) as code that talks to a real chain.

The node listens on ``127.0.0.1`` (or the given ``host``) on a free port, mines every transaction as it arrives
(or every ``block_time`` seconds), and pre-funds ten unlocked dev accounts derived from
anvil's well-known ``test test ... junk`` mnemonic.  Unless ``persist_state=False``, it
runs with ``--state PATH``: anvil loads the chain from ``PATH`` when it starts and dumps
it back there when it is stopped (SIGTERM), so :meth:`AnvilNode.restart` continues the
same chain with the same balances, nonces, blocks and contracts.

The binary is looked up in this order:

1. the ``binary`` argument;
2. the ``GOLEM_DASK_ANVIL`` environment variable;
3. ``.ci/work/npm/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil`` in the
   source tree, where ``.ci/install-anvil`` puts it;
4. ``anvil`` on ``PATH``.

web3 costs more than a second to import, so this module imports it only inside the
functions that need it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from golem_dask.chain import rpc
from golem_dask.errors import GolemDaskError, PaymentError
from golem_dask.protocol.identity import checksum_address

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from web3 import Web3

    from golem_dask.protocol.identity import Wallet

__all__ = ["ANVIL_ENV_VAR", "AnvilError", "AnvilNode", "AnvilNotFoundError", "find_anvil"]

logger = logging.getLogger(__name__)

#: Environment variable naming the anvil binary to use.
ANVIL_ENV_VAR = "GOLEM_DASK_ANVIL"

#: Where ``.ci/install-anvil`` installs the binary, relative to the source tree.
_REPO_BINARY = Path(".ci/work/npm/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")

#: The source tree this module lives in (meaningful for an editable install only).
_REPO_ROOT = Path(__file__).resolve().parents[2]

#: anvil's default chain id, also used by Hardhat: wallets and tools recognise it as a
#: local development chain.
DEFAULT_CHAIN_ID = 31337

_INSTALL_HINT = (
    "run `.ci/install-anvil` in the golem-dask source tree (it installs the npm "
    f"package @foundry-rs/anvil), or set {ANVIL_ENV_VAR} to the path of an anvil binary"
)


class AnvilError(GolemDaskError):
    """The anvil node could not be started, reached or stopped."""


class AnvilNotFoundError(AnvilError):
    """No anvil binary was found; the message says how to install one."""


def find_anvil(binary: str | os.PathLike[str] | None = None) -> Path:
    """Locate the anvil binary (see the module docstring for the search order).

    Raises
    ------
    AnvilNotFoundError
        If no executable anvil is found.  An explicit ``binary`` or
        ``GOLEM_DASK_ANVIL`` that does not name an executable is an error too, rather
        than silently falling back to another anvil.
    """
    explicit = binary if binary is not None else os.environ.get(ANVIL_ENV_VAR) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file() or not os.access(path, os.X_OK):
            # A bare name ("anvil") set in the variable is looked up on PATH.
            found = shutil.which(str(explicit)) if os.sep not in str(explicit) else None
            if found is None:
                source = "binary argument" if binary is not None else ANVIL_ENV_VAR
                raise AnvilNotFoundError(
                    f"{source} names {str(explicit)!r}, which is not an executable file; "
                    + _INSTALL_HINT
                )
            path = Path(found)
        return path.resolve()
    in_repo = _REPO_ROOT / _REPO_BINARY
    if in_repo.is_file() and os.access(in_repo, os.X_OK):
        return in_repo
    found = shutil.which("anvil")
    if found is not None:
        return Path(found).resolve()
    raise AnvilNotFoundError(f"the anvil Ethereum node is not installed; {_INSTALL_HINT}")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _AnvilProcess:
    """The anvil process and the directory an :class:`AnvilNode` owns: started, waited
    for, stopped, and released even if the node is never stopped.

    Kept apart from the node so that a :func:`weakref.finalize` can hold it without
    keeping the node alive.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.owned_dir: Path | None = None

    def stop(self, timeout: float) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()  # SIGTERM to proc.pid: anvil dumps its state and exits
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "anvil (pid %d) ignored SIGTERM for %.0f s; killing it, its state "
                    "is not saved",
                    proc.pid,
                    timeout,
                )
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        self.stop(timeout=10.0)
        owned, self.owned_dir = self.owned_dir, None
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)

    def launch(self, cmd: list[str], url: str, log_path: Path, startup_timeout: float) -> tuple[int, list[str]]:
        """Start ``cmd`` (output appended to ``log_path``) and wait until ``url`` answers;
        returns the node's chain id and its dev accounts.

        Raises :class:`_PortTaken` if anvil exits because its port is in use, AnvilError
        if it exits otherwise or does not answer within ``startup_timeout``.
        """
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session: a Ctrl-C meant for the test run does not kill anvil before the
            # fixture's teardown has asked it to save its state.
            proc = self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True, close_fds=True)
        deadline = time.monotonic() + startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                self.proc = None
                output = _read_from(log_path, log_start)
                if "in use" in output.lower():
                    raise _PortTaken
                raise AnvilError(f"anvil exited with code {code} before answering on {url}; "
                                 f"its output ({log_path}):\n{output[-2000:]}")
            try:
                return int(rpc.call(url, "eth_chainId", timeout_s=1.0), 16), rpc.call(url, "eth_accounts", timeout_s=5.0)
            except (OSError, ValueError, PaymentError):
                # Not listening yet (connection refused, reset) or not ready.
                if time.monotonic() > deadline:
                    self.stop(timeout=5.0)
                    raise AnvilError(f"anvil (pid {proc.pid}) did not answer on {url} within {startup_timeout:.0f} s; "
                                     f"its output ({log_path}):\n{_read_from(log_path, log_start)[-2000:]}") from None
                time.sleep(0.02)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


class AnvilNode:
    """An anvil process, started and stopped by this object.

    Parameters
    ----------
    binary:
        Path of the anvil binary; by default :func:`find_anvil` locates it.
    port:
        TCP port to listen on; by default a free one is picked.  :meth:`restart`
        keeps the port.
    chain_id:
        The chain id (default 31337).
    block_time:
        Seconds between blocks (interval mining; fractions allowed).  ``None``, the
        default, mines each transaction as soon as it arrives.
    accounts:
        Number of pre-funded dev accounts.
    balance_eth:
        ETH held by each dev account at genesis.
    persist_state:
        Run anvil with ``--state``: the chain is saved when the node stops and loaded
        when it starts again, so :meth:`restart` continues the same chain.  With
        ``False``, every start is a fresh chain.
    state_dir:
        Directory for the state file, anvil's log and its config dump.  By default a
        temporary directory that :meth:`close` removes; a given directory is kept, so a
        new ``AnvilNode(state_dir=...)`` continues the chain saved there.
    startup_timeout:
        Seconds to wait for the JSON-RPC endpoint to answer.
    extra_args:
        More command-line arguments for anvil (e.g. ``["--hardfork", "cancun"]``).
    host:
        The address to listen on (default loopback; another host's providers, checking
        their payments, need one they can reach).

    Attributes
    ----------
    contracts:
        Free for callers (e.g. test fixtures) to record deployed contract addresses;
        the node itself never sets it.

    Examples
    --------
    ::

        with AnvilNode() as node:
            w3 = node.web3()
            addresses = deploy_contracts(w3, node.accounts[0])
            node.restart()           # same port, same chain
            assert w3.eth.get_code(addresses["token"])
    """

    contracts: dict[str, str | None] | None

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] | None = None,
        port: int | None = None,
        chain_id: int = DEFAULT_CHAIN_ID,
        block_time: float | None = None,
        accounts: int = 10,
        balance_eth: int = 10_000,
        persist_state: bool = True,
        state_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
    ) -> None:
        if block_time is not None and not block_time > 0:
            raise ValueError(f"block_time must be positive seconds or None, got {block_time!r}")
        self.binary: Path = find_anvil(binary)
        self.host = host
        self.chain_id = int(chain_id)
        self.block_time = block_time
        self.persist_state = persist_state
        self.startup_timeout = startup_timeout
        self.contracts = None
        self._num_accounts = int(accounts)
        self._balance_eth = int(balance_eth)
        self._extra_args = [str(a) for a in extra_args]
        self._port: int | None = port
        self._accounts: list[str] = []
        self._resources = _AnvilProcess()
        if state_dir is None:
            self._resources.owned_dir = Path(tempfile.mkdtemp(prefix="golem-dask-anvil-"))
            self.state_dir = self._resources.owned_dir
        else:
            self.state_dir = Path(state_dir)
            self.state_dir.mkdir(parents=True, exist_ok=True)
        # Kills the process and removes an owned directory if the node is garbage
        # collected or the interpreter exits without stop()/close().
        self._finalizer = weakref.finalize(self, self._resources.close)

    # --- properties ---------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        """The file anvil loads its chain from and dumps it to (``--state``)."""
        return self.state_dir / "state.json"

    @property
    def log_path(self) -> Path:
        """anvil's stdout and stderr, appended across restarts."""
        return self.state_dir / "anvil.log"

    @property
    def port(self) -> int:
        """The TCP port; fixed by the first :meth:`start`."""
        if self._port is None:
            raise AnvilError("the node has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """The JSON-RPC endpoint, ``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running anvil process, ``None`` when it is stopped."""
        proc = self._resources.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the anvil process is alive (not necessarily answering yet)."""
        return self.pid is not None

    @property
    def accounts(self) -> list[str]:
        """Checksummed addresses of the pre-funded dev accounts, unlocked on anvil."""
        if not self._accounts:
            raise AnvilError("the node has not been started yet")
        return list(self._accounts)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> AnvilNode:
        """Start anvil and return once its JSON-RPC endpoint answers.

        Returns ``self``.  Starting a running node is a no-op.

        Raises
        ------
        AnvilError
            If anvil exits or does not answer within ``startup_timeout``.  The
            message includes the end of its log.
        """
        if self.running:
            return self
        if self._resources.owned_dir is None and not self.state_dir.exists():
            raise AnvilError(f"{self.state_dir} was removed; the node was closed")
        # A port picked here could be taken by someone else before anvil binds it;
        # then pick another.  A given port, or the port of an earlier start (restart),
        # is kept: clients hold its URL.
        pick_port = self._port is None
        attempts = 3 if pick_port else 1
        for attempt in range(attempts):
            if pick_port:
                self._port = _free_port(self.host)
            try:
                self._launch()
            except _PortTaken:
                if attempt + 1 < attempts:
                    logger.debug("port %d was taken before anvil bound it; retrying", self._port)
                    continue
                raise AnvilError(
                    f"anvil could not listen on {self.host}:{self._port}: the port is in use"
                ) from None
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _command(self) -> list[str]:
        cmd = [
            str(self.binary),
            "--host", self.host,
            "--port", str(self.port),
            "--chain-id", str(self.chain_id),
            "--accounts", str(self._num_accounts),
            "--balance", str(self._balance_eth),
            "--config-out", str(self.state_dir / "config.json"),
            "--quiet",
        ]  # fmt: skip
        if self.block_time is not None:
            cmd += ["--block-time", str(self.block_time)]
        if self.persist_state:
            # --state = --load-state PATH (if it exists) + --dump-state PATH on exit.
            cmd += ["--state", str(self.state_path)]
        return cmd + self._extra_args

    def _launch(self) -> None:
        started = time.monotonic()
        chain_id, accounts = self._resources.launch(self._command(), self.url, self.log_path, self.startup_timeout)
        if chain_id != self.chain_id:
            self._resources.stop(timeout=5.0)
            raise AnvilError(
                f"anvil on {self.url} reports chain id {chain_id}, expected {self.chain_id}: "
                "is another node listening on that port?"
            )
        self._accounts = [checksum_address(a) for a in accounts]
        logger.info("anvil ready in %.2f s: pid %s, %s, chain id %d%s", time.monotonic() - started, self.pid,
                    self.url, self.chain_id, f", state {self.state_path}" if self.persist_state else "")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop anvil: SIGTERM to its PID, wait, SIGKILL after ``timeout`` seconds.

        On SIGTERM anvil writes its state to :attr:`state_path` (with
        ``persist_state``); a killed anvil saves nothing.  Idempotent; the state
        directory is kept, so :meth:`start` continues the chain.
        """
        pid = self.pid
        code = self._resources.stop(timeout)
        if pid is not None:
            logger.info("anvil (pid %d) stopped with exit code %s", pid, code)

    def restart(self, timeout: float = 10.0) -> AnvilNode:
        """Stop and start anvil on the same port, continuing the same chain.

        Raises
        ------
        AnvilError
            If the node was never started, or (with ``persist_state``) anvil did not
            save its state when stopped, so restarting would silently reset the chain.
        """
        if self._port is None:
            raise AnvilError("restart() needs a node that was started")
        before = self.state_path.stat().st_mtime_ns if self.state_path.exists() else None
        was_running = self.running
        self.stop(timeout)
        if self.persist_state and was_running:
            after = self.state_path.stat().st_mtime_ns if self.state_path.exists() else None
            if after is None or after == before:
                raise AnvilError(
                    f"anvil did not write its state to {self.state_path} when stopped; "
                    f"not restarting on an empty chain (see {self.log_path})"
                )
        return self.start()

    def close(self) -> None:
        """Stop anvil and remove the state directory if this node created it."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> AnvilNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- conveniences -------------------------------------------------------------

    def web3(self, request_timeout: float | None = None) -> Web3:
        """A new ``web3.Web3`` connected to this node over HTTP (:func:`~golem_dask.chain.rpc.connect`).

        It keeps working across :meth:`restart`, since the URL does not change.
        """
        return rpc.connect(self.url, request_timeout)

    def dev_wallet(self, index: int = 0) -> Wallet:
        """A :class:`Wallet` holding dev account ``index``'s key.

        These keys derive from anvil's public test mnemonic: use them only on this
        node.
        """
        from golem_dask.protocol.identity import Wallet

        try:
            config = json.loads((self.state_dir / "config.json").read_text())
            key = config["private_keys"][index]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise AnvilError(f"no dev account {index} in anvil's config dump: {e}") from None
        return Wallet.from_key(key)

    def __repr__(self) -> str:
        where = f"{self.url}, pid {self.pid}" if self.running else "stopped"
        return f"AnvilNode({where}, chain_id={self.chain_id})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "an AnvilNode owns a local process and cannot be pickled; pass node.url"
        )


class _PortTaken(Exception):
    """Internal: anvil exited because its port was taken."""
