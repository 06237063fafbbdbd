"""``golem-dask devnet``: a development chain for the many-machines mode from the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal

import psutil

from anvil_support import anvil_binary
from golem_dask.chain.units import from_wei
from golem_dask.protocol.identity import Wallet
from net_support import free_port


def test_devnet_deploys_funds_prints_the_config_and_stops_its_chain() -> None:
    address = Wallet.from_key("77" * 32).address
    port = free_port()
    env = {**os.environ, "GOLEM_DASK_ANVIL": str(anvil_binary())}
    proc = subprocess.Popen([sys.executable, "-m", "golem_dask.cli", "devnet", "--port", str(port), "--fund", address,
                             "--tokens", "7.5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not lines or lines[-1] != "# Ctrl-C stops it":
            assert time.monotonic() < deadline and proc.poll() is None, (lines, proc.stderr.read() if proc.stderr else "")
            lines.append(proc.stdout.readline().rstrip("\n"))  # type: ignore[union-attr]
        exports = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
        assert exports["DASK_GOLEM__PAYMENT__RPC_URL"] == f"http://127.0.0.1:{port}"
        assert f"# funded {address}: 7.5 GLM and 1 ETH for gas" in lines
        # The printed configuration reaches a chain where the address holds what it was given.
        from web3 import Web3

        from golem_dask.chain.deploy import token_contract

        w3 = Web3(Web3.HTTPProvider(exports["DASK_GOLEM__PAYMENT__RPC_URL"]))
        token = token_contract(w3, exports["DASK_GOLEM__PAYMENT__TOKEN_ADDRESS"])
        assert from_wei(token.functions.balanceOf(address).call()) == Decimal("7.5")
        assert w3.eth.get_balance(address) == 10**18
        assert w3.eth.get_code(exports["DASK_GOLEM__PAYMENT__BATCH_ADDRESS"])
        anvils = [p for p in psutil.Process(proc.pid).children(recursive=True) if "anvil" in p.name()]
        assert anvils
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert not [p for p in anvils if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_devnet_refuses_a_malformed_address_before_starting_anything() -> None:
    out = subprocess.run([sys.executable, "-m", "golem_dask.cli", "devnet", "--fund", "0x1234"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "golem-dask devnet:" in out.stderr and "0x1234" in out.stderr
