"""The shipped GolemDaskToken: artefact reproducibility and ERC-20 behaviour on the devnet."""

from __future__ import annotations

import json
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from golem_dask.errors import ConfigError
from golem_dask.chain.contracts import available_artifacts, load_artifact
from golem_dask.chain.devnet import Devnet
from golem_dask.protocol.identity import Wallet

TOKEN = "GolemDaskToken"
ONE = 10**18  # one token in wei
ZERO_ADDRESS = "0x" + "00" * 20


# --- artefact -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_module() -> Any:
    pytest.importorskip(
        "vyper",
        reason="the Vyper compiler is needed to check the artefact: pip install vyper==0.4.3",
    )
    from golem_dask.chain.contracts import build

    return build


@pytest.mark.parametrize("name", [TOKEN, "GolemDaskBatch"])
def test_recompiling_the_source_gives_the_shipped_artefact(build_module: Any, name: str) -> None:
    source = build_module.CONTRACTS_DIR / f"{name}.vy"
    fresh = build_module.compile_contract(source)
    shipped = load_artifact(name)
    assert fresh["bytecode"] == shipped["bytecode"]
    assert fresh["abi"] == shipped["abi"]
    assert fresh == shipped
    # Byte-for-byte, so `build --check` passes in CI.
    assert build_module.render_artifact(fresh) == source.with_suffix(".json").read_text()


def test_source_pins_the_compiler_version() -> None:
    shipped = load_artifact(TOKEN)
    from golem_dask.chain.contracts import build  # importable without vyper

    source = (build.CONTRACTS_DIR / f"{TOKEN}.vy").read_text()
    assert source.splitlines()[0] == "# pragma version 0.4.3"
    assert shipped["vyper_version"] == "0.4.3"


def test_build_check_names_a_stale_artefact(
    build_module: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(build_module.CONTRACTS_DIR / f"{TOKEN}.vy", tmp_path)
    stale = tmp_path / f"{TOKEN}.json"
    artifact = load_artifact(TOKEN)
    artifact["bytecode"] = artifact["bytecode"][:-2] + "00"
    stale.write_text(json.dumps(artifact))

    assert build_module.main(["--check", "--dir", str(tmp_path)]) == 1
    assert str(stale) in capsys.readouterr().err

    assert build_module.main(["--dir", str(tmp_path)]) == 0  # rewrites it ...
    assert build_module.main(["--check", "--dir", str(tmp_path)]) == 0  # ... correctly
    assert json.loads(stale.read_text()) == load_artifact(TOKEN)


def test_load_artifact() -> None:
    assert TOKEN in available_artifacts()
    artifact = load_artifact(TOKEN)
    assert sorted(artifact) == ["abi", "bytecode", "contract_name", "runtime_bytecode", "source_sha256", "vyper_version"]
    assert artifact["bytecode"].startswith("0x")
    artifact["abi"].clear()  # callers get their own copy
    assert load_artifact(TOKEN)["abi"]
    with pytest.raises(ConfigError, match="NoSuchToken"):
        load_artifact("NoSuchToken")


# --- ERC-20 behaviour ------------------------------------------------------------------


@pytest.fixture(scope="module")
def devnet() -> Devnet:
    return Devnet.shared()


def holder(devnet: Devnet, tokens: int = 0) -> Wallet:
    """A fresh account with ETH for gas and ``tokens`` tokens: balances never mix."""
    wallet = Wallet.generate()
    devnet.fund(wallet.address, Decimal(tokens), eth_wei=10**17)
    return wallet


def send(devnet: Devnet, wallet: Wallet, fn: Any) -> Any:
    """Sign ``fn`` as a transaction from ``wallet``, send it, return its receipt.

    The gas limit is fixed so a reverting call is mined (status 0) instead of failing
    in gas estimation: the test sees what the chain does, not what web3 predicts.
    """
    with devnet.lock:
        w3 = devnet.w3
        tx = fn.build_transaction(
            {
                "from": wallet.address,
                "nonce": w3.eth.get_transaction_count(wallet.address),
                "gas": 200_000,
                "chainId": devnet.chain_id,
            }
        )
        tx_hash = w3.eth.send_raw_transaction(wallet.sign_transaction(tx))
        return w3.eth.wait_for_transaction_receipt(tx_hash)


def balance(devnet: Devnet, address: str) -> int:
    with devnet.lock:
        return devnet.token.functions.balanceOf(address).call()


def test_metadata_and_minter(devnet: Devnet) -> None:
    fns = devnet.token.functions
    with devnet.lock:
        assert fns.name().call() == "golem-dask test GLM"
        assert fns.symbol().call() == "tGLM"
        assert fns.decimals().call() == 18
        assert fns.minter().call() == devnet.faucet


def test_mint_by_minter_raises_supply_and_logs_transfer(devnet: Devnet) -> None:
    to = Wallet.generate().address
    with devnet.lock:
        supply = devnet.token.functions.totalSupply().call()
        tx_hash = devnet.token.functions.mint(to, 3 * ONE).transact({"from": devnet.faucet})
        receipt = devnet.w3.eth.wait_for_transaction_receipt(tx_hash)
        assert devnet.token.functions.totalSupply().call() == supply + 3 * ONE
        (event,) = devnet.token.events.Transfer().process_receipt(receipt)
    assert event["args"] == {"sender": ZERO_ADDRESS, "receiver": to, "value": 3 * ONE}
    assert balance(devnet, to) == 3 * ONE


def test_mint_by_anyone_else_reverts(devnet: Devnet) -> None:
    intruder = holder(devnet)
    with devnet.lock:
        supply = devnet.token.functions.totalSupply().call()
        with pytest.raises(Exception, match="only the minter can mint"):
            devnet.token.functions.mint(intruder.address, ONE).call({"from": intruder.address})
    receipt = send(devnet, intruder, devnet.token.functions.mint(intruder.address, ONE))
    assert receipt["status"] == 0
    assert balance(devnet, intruder.address) == 0
    with devnet.lock:
        assert devnet.token.functions.totalSupply().call() == supply


def test_transfer_moves_tokens_and_logs(devnet: Devnet) -> None:
    alice, bob = holder(devnet, 10), Wallet.generate()
    receipt = send(devnet, alice, devnet.token.functions.transfer(bob.address, 4 * ONE))
    assert receipt["status"] == 1
    with devnet.lock:
        (event,) = devnet.token.events.Transfer().process_receipt(receipt)
    assert event["args"] == {"sender": alice.address, "receiver": bob.address, "value": 4 * ONE}
    assert balance(devnet, alice.address) == 6 * ONE
    assert balance(devnet, bob.address) == 4 * ONE


def test_transfer_beyond_balance_reverts(devnet: Devnet) -> None:
    alice, bob = holder(devnet, 1), Wallet.generate()
    fn = devnet.token.functions.transfer(bob.address, ONE + 1)
    with devnet.lock, pytest.raises(Exception, match="insufficient balance"):
        fn.call({"from": alice.address})
    assert send(devnet, alice, fn)["status"] == 0
    assert balance(devnet, alice.address) == ONE
    assert balance(devnet, bob.address) == 0


def test_transfer_to_zero_address_reverts(devnet: Devnet) -> None:
    alice = holder(devnet, 1)
    assert send(devnet, alice, devnet.token.functions.transfer(ZERO_ADDRESS, 1))["status"] == 0
    assert balance(devnet, alice.address) == ONE


def test_approve_and_transfer_from(devnet: Devnet) -> None:
    owner, spender, receiver = holder(devnet, 10), holder(devnet), holder(devnet)
    fns = devnet.token.functions

    receipt = send(devnet, owner, fns.approve(spender.address, 5 * ONE))
    with devnet.lock:
        (event,) = devnet.token.events.Approval().process_receipt(receipt)
        assert fns.allowance(owner.address, spender.address).call() == 5 * ONE
    assert event["args"] == {"owner": owner.address, "spender": spender.address, "value": 5 * ONE}

    receipt = send(devnet, spender, fns.transferFrom(owner.address, receiver.address, 2 * ONE))
    assert receipt["status"] == 1
    assert balance(devnet, owner.address) == 8 * ONE
    assert balance(devnet, receiver.address) == 2 * ONE
    with devnet.lock:
        assert fns.allowance(owner.address, spender.address).call() == 3 * ONE

    # More than the remaining allowance: reverts and changes nothing.
    over = fns.transferFrom(owner.address, receiver.address, 3 * ONE + 1)
    with devnet.lock, pytest.raises(Exception, match="insufficient allowance"):
        over.call({"from": spender.address})
    assert send(devnet, spender, over)["status"] == 0
    assert balance(devnet, owner.address) == 8 * ONE
    # Nobody else can spend the owner's tokens.
    assert send(devnet, receiver, fns.transferFrom(owner.address, receiver.address, 1))[
        "status"
    ] == 0


def test_transfer_from_within_allowance_but_beyond_balance_reverts(devnet: Devnet) -> None:
    owner, spender = holder(devnet, 1), holder(devnet)
    fns = devnet.token.functions
    send(devnet, owner, fns.approve(spender.address, 2**256 - 1))
    receipt = send(devnet, spender, fns.transferFrom(owner.address, spender.address, 2 * ONE))
    assert receipt["status"] == 0
    # An unlimited allowance is not decremented by a successful transferFrom.
    assert send(devnet, spender, fns.transferFrom(owner.address, spender.address, ONE))[
        "status"
    ] == 1
    with devnet.lock:
        assert fns.allowance(owner.address, spender.address).call() == 2**256 - 1
    assert balance(devnet, spender.address) == ONE
