"""AnvilNode: a real anvil process, contracts on it, signed transfers, restarts, cleanup."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import pytest
from anvil_support import anvil, anvil_binary  # noqa: F401

from golem_dask.chain.contracts import available_artifacts, load_artifact
from golem_dask.chain.anvil import AnvilNode, AnvilNotFoundError, find_anvil
from golem_dask.chain.deploy import deploy_contracts, fund
from golem_dask.protocol.identity import Wallet

ONE = 10**18  # one token (or one ETH) in wei
GWEI = 10**9


def anvil_children() -> list[psutil.Process]:
    """anvil processes started (directly or not) by this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "anvil" in child.name():
                found.append(child)
        except psutil.Error:
            continue
    return found


def gone(pid: int) -> bool:
    """Whether no process, not even an unreaped zombie, has this PID any more."""
    return not psutil.pid_exists(pid)


def token_contract(w3: Any, address: str) -> Any:
    return w3.eth.contract(address=address, abi=load_artifact("GolemDaskToken")["abi"])


def signed_transfer(w3: Any, wallet: Wallet, token: Any, to: str, wei: int) -> Any:
    """Transfer tokens with a transaction signed by ``wallet``; return the receipt."""
    nonce = w3.eth.get_transaction_count(wallet.address, "pending")
    base_fee = w3.eth.get_block("latest")["baseFeePerGas"]
    tx = token.functions.transfer(to, wei).build_transaction(
        {
            "from": wallet.address,
            "chainId": w3.eth.chain_id,
            "nonce": nonce,
            "maxPriorityFeePerGas": GWEI,
            "maxFeePerGas": 2 * base_fee + GWEI,
        }
    )
    raw = wallet.sign_transaction(dict(tx))
    assert raw[0] == 2  # an EIP-1559 (type 2) transaction
    tx_hash = w3.eth.send_raw_transaction(raw)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    assert receipt["transactionHash"] == tx_hash
    return receipt


# --- the node --------------------------------------------------------------------------


def test_anvil_starts_and_answers(anvil: AnvilNode) -> None:  # noqa: F811
    w3 = anvil.web3()
    assert anvil.url == f"http://127.0.0.1:{anvil.port}"
    assert w3.is_connected()
    assert w3.eth.chain_id == 31337
    assert psutil.Process(anvil.pid).name() == "anvil"
    assert anvil.running
    # Ten pre-funded dev accounts, unlocked: the node signs for them.
    assert len(anvil.accounts) == 10
    assert [a.lower() for a in w3.eth.accounts] == [a.lower() for a in anvil.accounts]
    assert w3.eth.get_balance(anvil.accounts[9]) == 10_000 * ONE
    # Instant mining: each transaction gets its own block at once.
    before = w3.eth.block_number
    tx_hash = w3.eth.send_transaction(
        {"from": anvil.accounts[1], "to": anvil.accounts[2], "value": 1}
    )
    assert w3.eth.get_transaction_receipt(tx_hash)["blockNumber"] == before + 1
    assert "AnvilNode(http://127.0.0.1:" in repr(anvil)


def test_contracts_are_deployed(anvil: AnvilNode) -> None:  # noqa: F811
    w3 = anvil.web3()
    assert anvil.contracts is not None
    token = token_contract(w3, anvil.contracts["token"])
    assert w3.eth.get_code(token.address)
    assert token.functions.symbol().call() == "tGLM"
    assert token.functions.minter().call() == anvil.accounts[0]
    assert token.functions.totalSupply().call() == 0
    if "GolemDaskBatch" in available_artifacts():
        assert anvil.contracts["batch"] is not None
        assert w3.eth.get_code(anvil.contracts["batch"])
    else:
        assert anvil.contracts["batch"] is None


def test_fund_sends_eth_and_mints_tokens(anvil: AnvilNode) -> None:  # noqa: F811
    w3 = anvil.web3()
    assert anvil.contracts is not None
    address = Wallet.generate().address
    fund(w3, anvil.contracts["token"], anvil.accounts[0], address, Decimal("2.5"), eth_wei=3)
    token = token_contract(w3, anvil.contracts["token"])
    assert token.functions.balanceOf(address).call() == 5 * ONE // 2
    assert w3.eth.get_balance(address) == 3


def test_token_transfer_signed_by_wallet_lands(anvil: AnvilNode) -> None:  # noqa: F811
    w3 = anvil.web3()
    assert anvil.contracts is not None
    token = token_contract(w3, anvil.contracts["token"])
    payer, payee = Wallet.generate(), Wallet.generate()
    fund(w3, token, anvil.accounts[0], payer.address, Decimal(10))

    receipt = signed_transfer(w3, payer, token, payee.address, 3 * ONE)

    assert receipt["status"] == 1
    assert receipt["type"] == 2
    assert receipt["from"] == payer.address
    assert receipt["to"] == token.address
    (event,) = token.events.Transfer().process_receipt(receipt)
    assert event["args"] == {"sender": payer.address, "receiver": payee.address, "value": 3 * ONE}
    assert token.functions.balanceOf(payer.address).call() == 7 * ONE
    assert token.functions.balanceOf(payee.address).call() == 3 * ONE
    assert w3.eth.get_transaction_count(payer.address) == 1


def test_dev_wallet_signs_for_a_prefunded_account(anvil: AnvilNode) -> None:  # noqa: F811
    w3 = anvil.web3()
    wallet = anvil.dev_wallet(3)
    assert wallet.address == anvil.accounts[3]
    tx = {
        "to": anvil.accounts[4],
        "value": 5,
        "gas": 21_000,
        "nonce": w3.eth.get_transaction_count(wallet.address),
        "chainId": anvil.chain_id,
        "maxFeePerGas": 10 * GWEI,
        "maxPriorityFeePerGas": GWEI,
    }
    tx_hash = w3.eth.send_raw_transaction(wallet.sign_transaction(tx))
    assert w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)["status"] == 1


# --- restart and persistence -----------------------------------------------------------


def test_restart_keeps_the_chain(anvil: AnvilNode) -> None:  # noqa: F811
    w3 = anvil.web3()
    assert anvil.contracts is not None
    token = token_contract(w3, anvil.contracts["token"])
    payer, payee = Wallet.generate(), Wallet.generate()
    fund(w3, token, anvil.accounts[0], payer.address, Decimal(10))
    first = signed_transfer(w3, payer, token, payee.address, 4 * ONE)

    def snapshot() -> dict[str, Any]:
        return {
            "block": w3.eth.block_number,
            "tokens": [token.functions.balanceOf(a).call() for a in (payer.address, payee.address)],
            "eth": [w3.eth.get_balance(a) for a in (payer.address, anvil.accounts[0])],
            "nonces": [
                w3.eth.get_transaction_count(a) for a in (payer.address, anvil.accounts[0])
            ],
            "code": w3.eth.get_code(token.address),
        }

    before = snapshot()
    url, old_pid = anvil.url, anvil.pid
    assert old_pid is not None

    anvil.restart()

    assert anvil.url == url  # same port: existing clients keep working
    assert anvil.pid not in (None, old_pid)
    assert gone(old_pid)
    assert anvil.state_path.is_file()
    assert snapshot() == before
    assert w3.eth.get_transaction_receipt(first["transactionHash"])["status"] == 1
    # The payer's nonce continues, so its next transfer is accepted and mined.
    second = signed_transfer(w3, payer, token, payee.address, ONE)
    assert second["status"] == 1
    assert second["blockNumber"] == before["block"] + 1
    assert w3.eth.get_transaction_count(payer.address) == before["nonces"][0] + 1
    assert token.functions.balanceOf(payee.address).call() == 5 * ONE


def test_a_new_node_on_the_same_state_dir_continues_the_chain(tmp_path: Path) -> None:
    binary = anvil_binary()
    receiver = Wallet.generate().address
    with AnvilNode(binary=binary, state_dir=tmp_path) as node:
        w3 = node.web3()
        w3.eth.send_transaction({"from": node.accounts[0], "to": receiver, "value": 42})
        block = w3.eth.block_number
    with AnvilNode(binary=binary, state_dir=tmp_path) as node:
        w3 = node.web3()
        assert w3.eth.get_balance(receiver) == 42
        assert w3.eth.block_number == block
        assert w3.eth.get_transaction_count(node.accounts[0]) == 1
    assert tmp_path.is_dir()  # a given state_dir is kept


def test_without_persistence_a_restart_is_a_fresh_chain() -> None:
    with AnvilNode(binary=anvil_binary(), persist_state=False) as node:
        w3 = node.web3()
        w3.eth.send_transaction({"from": node.accounts[0], "to": node.accounts[1], "value": 1})
        assert w3.eth.block_number == 1
        node.restart()
        assert w3.eth.block_number == 0


def test_block_time_mines_blocks_without_transactions() -> None:
    with AnvilNode(binary=anvil_binary(), block_time=0.2) as node:
        w3 = node.web3()
        start = w3.eth.block_number
        deadline = time.monotonic() + 10
        while w3.eth.block_number < start + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w3.eth.block_number >= start + 2


# --- stopping --------------------------------------------------------------------------


def test_stop_leaves_no_anvil_process() -> None:
    node = AnvilNode(binary=anvil_binary())
    node.start()
    pid = node.pid
    assert pid is not None
    assert psutil.Process(pid).name() == "anvil"
    state_dir = node.state_dir

    node.stop()

    assert gone(pid)
    assert node.pid is None and not node.running
    node.stop()  # idempotent
    assert anvil_children() == []
    assert state_dir.is_dir()  # stop() keeps the chain for a later start()
    node.close()
    assert not state_dir.exists()  # close() removes the directory it created


def test_context_manager_stops_the_node_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with AnvilNode(binary=anvil_binary()) as node:
            pid = node.pid
            raise RuntimeError("boom")
    assert pid is not None and gone(pid)
    assert anvil_children() == []


FIXTURE_PIDS: list[int] = []


def test_the_fixture_runs_a_node(anvil: AnvilNode) -> None:  # noqa: F811
    assert anvil.pid is not None and psutil.Process(anvil.pid).name() == "anvil"
    FIXTURE_PIDS.append(anvil.pid)


def test_the_fixture_left_no_anvil_process() -> None:
    # Runs after the fixture-based tests above (pytest keeps file order): the node the
    # test above had is gone, and no other is left.
    anvil_binary()  # without anvil this module checks nothing: skip, or fail in CI
    assert FIXTURE_PIDS, "the fixture test above did not run"
    assert all(gone(pid) for pid in FIXTURE_PIDS)
    assert anvil_children() == []


# --- finding the binary ----------------------------------------------------------------


def test_missing_binary_names_the_install_script(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOLEM_DASK_ANVIL", "/nonexistent/anvil")
    with pytest.raises(AnvilNotFoundError, match=r"\.ci/install-anvil"):
        find_anvil()
    with pytest.raises(AnvilNotFoundError, match="GOLEM_DASK_ANVIL"):
        AnvilNode()


def test_binary_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    binary = anvil_binary()
    monkeypatch.setenv("GOLEM_DASK_ANVIL", str(binary))
    assert find_anvil() == binary.resolve()


def test_deploy_contracts_needs_no_batch_artefact(
    anvil: AnvilNode,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import golem_dask.chain.deploy as deploy_module

    monkeypatch.setattr(
        deploy_module,
        "available_artifacts",
        lambda: [n for n in available_artifacts() if n != "GolemDaskBatch"],
    )
    addresses = deploy_contracts(anvil.web3(), anvil.accounts[1])
    assert addresses["batch"] is None
    assert addresses["token"] != anvil.contracts["token"]  # type: ignore[index]
