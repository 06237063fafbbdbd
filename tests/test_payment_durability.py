"""Payments that survive crashes and chain outages, on a real anvil node.

The requestor runs as its own process and is killed with SIGKILL at each durable step
of the payment path; after a restart every provider must have been paid exactly once,
checked against on-chain balances, on-chain Transfer events and the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import dask
import pytest

from anvil_support import anvil  # noqa: F401
from golem_dask.errors import PaymentError
from golem_dask.chain.units import from_wei
from golem_dask.payment.ledger import PAID, Ledger
from golem_dask.chain.deploy import fund
from golem_dask.protocol.identity import Wallet

SCRIPT = Path(__file__).with_name("payment_script.py")
AMOUNTS = [Decimal("1.5"), Decimal("0.25"), Decimal("2")]


def new_key() -> str:
    return os.urandom(32).hex()


def funded_requestor(node, tokens: Decimal = Decimal(10)) -> tuple[str, str]:
    key = new_key()
    address = Wallet.from_key(key).address
    fund(node.web3(), node.contracts["token"], node.accounts[0], address, tokens, 10**18)
    return key, address


def chain_config(node, batch: bool) -> dict[str, str]:
    config = {
        "DASK_GOLEM__PAYMENT__RPC_URL": node.url,
        "DASK_GOLEM__PAYMENT__CHAIN_ID": "31337",
        "DASK_GOLEM__PAYMENT__TOKEN_ADDRESS": node.contracts["token"],
        "DASK_GOLEM__PAYMENT__BATCH_WINDOW": "200ms",
        "DASK_GOLEM__PAYMENT__PAYMENT_TIMEOUT": "20s",
    }
    if batch:
        config["DASK_GOLEM__PAYMENT__BATCH_ADDRESS"] = node.contracts["batch"]
    return config


def balance(node, address: str) -> Decimal:
    from golem_dask.chain.contracts import load_artifact

    w3 = node.web3()
    token = w3.eth.contract(address=node.contracts["token"], abi=load_artifact("GolemDaskToken")["abi"])
    return from_wei(token.functions.balanceOf(address).call())


def transfers_to(node, payees: list[str]) -> dict[str, int]:
    from golem_dask.chain.contracts import load_artifact

    w3 = node.web3()
    token = w3.eth.contract(address=node.contracts["token"], abi=load_artifact("GolemDaskToken")["abi"])
    counts = dict.fromkeys(payees, 0)
    for event in token.events.Transfer().get_logs(from_block=0):
        if event["args"]["receiver"] in counts:
            counts[event["args"]["receiver"]] += 1
    return counts


def run_requestor(env: dict[str, str], data_dir: Path, crash_at: str, payees: list[str]) -> subprocess.CompletedProcess:
    args = [f"{p}:{a}" for p, a in zip(payees, AMOUNTS)]
    return subprocess.run([sys.executable, str(SCRIPT), str(data_dir), crash_at, *args],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("point", ["debt", "signed", "sent", "receipt"])
def test_killed_at_each_step_then_restarted_pays_everyone_exactly_once(anvil, tmp_path, point, batch):
    if batch and not anvil.contracts.get("batch"):
        pytest.fail("the batch contract artefact is missing")
    key, requestor = funded_requestor(anvil)
    payees = [Wallet.generate().address for _ in AMOUNTS]
    env = {**os.environ, **chain_config(anvil, batch), "GOLEM_DASK_PRIVATE_KEY": key}

    crashed = run_requestor(env, tmp_path, point, payees)
    assert crashed.returncode == -9, crashed.stderr
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.debts(), "the debt is written before anything else"
    ledger.close()

    again = run_requestor(env, tmp_path, "none", payees)
    assert again.returncode == 0, again.stderr
    for payee, amount in zip(payees, AMOUNTS):
        assert balance(anvil, payee) == amount
    assert balance(anvil, requestor) == Decimal(10) - sum(AMOUNTS)
    assert transfers_to(anvil, payees) == dict.fromkeys(payees, 1)

    ledger = Ledger(tmp_path / "ledger.sqlite")
    debts = ledger.debts()
    assert sorted(d.invoice_id for d in debts) == ["invoice-0", "invoice-1", "invoice-2"]
    assert {d.status for d in debts} == {PAID}
    payments = {p.id: p for p in ledger.payments()}
    for d in debts:
        assert payments[d.payment_id].status == "confirmed"
        assert d.id in payments[d.payment_id].debt_ids
    nonce = anvil.web3().eth.get_transaction_count(requestor)
    ledger.close()

    # A third run finds nothing to do: no transaction, no balance change.
    third = run_requestor(env, tmp_path, "none", payees)
    assert third.returncode == 0, third.stderr
    assert anvil.web3().eth.get_transaction_count(requestor) == nonce
    assert transfers_to(anvil, payees) == dict.fromkeys(payees, 1)


def test_batch_settles_several_debts_in_one_transaction(anvil, tmp_path):
    key, requestor = funded_requestor(anvil)
    payees = [Wallet.generate().address for _ in AMOUNTS]
    env = {**os.environ, **chain_config(anvil, True), "GOLEM_DASK_PRIVATE_KEY": key}
    done = run_requestor(env, tmp_path, "none", payees)
    assert done.returncode == 0, done.stderr
    hashes = {line.split()[-1] for line in done.stdout.splitlines() if line.startswith("paid")}
    assert len(hashes) == 1
    ledger = Ledger(tmp_path / "ledger.sqlite")
    (batch,) = [p for p in ledger.payments() if p.kind == "batch"]
    assert len(batch.debt_ids) == 3 and batch.confirmed_hash in hashes
    assert [p.kind for p in ledger.payments()] == ["approve", "batch"]


def test_private_key_never_leaks(anvil, tmp_path, caplog):
    from golem_dask.payment.ethereum import EthereumPayer

    key, requestor = funded_requestor(anvil, Decimal(1))
    payee = Wallet.generate().address
    caplog.set_level(logging.DEBUG)
    os.environ["GOLEM_DASK_TEST_KEY"] = key
    try:
        config = {k.removeprefix("DASK_GOLEM__").lower().replace("__", ".").replace("_", "-"): v
                  for k, v in chain_config(anvil, True).items()}
        with dask.config.set({f"golem.{k}": v for k, v in config.items()} | {
                "golem.payment.key-env": "GOLEM_DASK_TEST_KEY", "golem.payment.data-dir": str(tmp_path)}):
            payer = EthereumPayer.from_config()
        asyncio.run(payer.pay(payee, Decimal("0.5"), reference="ok"))
        with pytest.raises(PaymentError) as info:
            asyncio.run(payer.pay(payee, Decimal("5"), reference="too-much"))
    finally:
        del os.environ["GOLEM_DASK_TEST_KEY"]
    texts = [caplog.text, repr(payer), str(payer), str(info.value), repr(info.value), str(payer.ledger)]
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for form in (key, key.upper(), "0x" + key):
        assert all(form not in t for t in texts)
        assert form.encode() not in files and bytes.fromhex(key) not in files
    assert balance(anvil, payee) == Decimal("0.5")


def test_chain_outage_at_close_keeps_the_debt_and_pay_settles_it_once(anvil, tmp_path):
    from distributed import Client

    from golem_dask import GolemCluster

    key, requestor = funded_requestor(anvil)
    env = {**chain_config(anvil, False), "GOLEM_DASK_PRIVATE_KEY": key,
           "DASK_GOLEM__PAYMENT__DATA_DIR": str(tmp_path), "DASK_GOLEM__PAYMENT__PAYMENT_TIMEOUT": "5s"}
    settings = {f"golem.{k.removeprefix('DASK_GOLEM__').lower().replace('__', '.').replace('_', '-')}": v
                for k, v in env.items() if k.startswith("DASK_GOLEM__")}
    os.environ["GOLEM_DASK_PRIVATE_KEY"] = key
    try:
        with dask.config.set({**settings, "golem.demand.memory": "1GiB", "golem.provider.local": [
                {"name": "local", "cpu": 2, "memory": "4GiB", "runtime": "process"}]}):
            cluster = GolemCluster(n_workers=1, budget="1")
            with Client(cluster) as client:
                assert client.submit(sum, [1, 2]).result() == 3
            (agent,) = cluster.market.providers.values()
            anvil.stop()
            started = time.monotonic()
            cluster.close()
            elapsed = time.monotonic() - started
    finally:
        del os.environ["GOLEM_DASK_PRIVATE_KEY"]
    assert elapsed < 30
    (entry,) = cluster.bill().entries
    assert entry.status == "payment failed" and entry.amount > 0
    assert cluster.bill().owed == entry.amount
    assert any("still owed" in str(e) and agent.id in str(e) for e in cluster.events.of_kind("warning"))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    (debt,) = ledger.owed(requestor)
    assert debt.payee == agent.id and debt.amount == entry.amount
    ledger.close()

    anvil.restart()
    cli = [sys.executable, "-m", "golem_dask.cli", "pay"]
    first = subprocess.run(cli, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "1 payments confirmed; 0 debts still owed" in first.stdout
    assert balance(anvil, agent.id) == entry.amount
    second = subprocess.run(cli, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "0 payments confirmed" in second.stdout
    assert balance(anvil, agent.id) == entry.amount
    listing = subprocess.run([sys.executable, "-m", "golem_dask.cli", "ledger", "--json"],
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and '"status": "paid"' in listing.stdout
    table = subprocess.run([sys.executable, "-m", "golem_dask.cli", "ledger"],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and agent.id in table.stdout and "still owed: 0 GLM" in table.stdout


def test_a_replacement_the_original_beat_into_a_block_still_confirms(anvil, tmp_path, monkeypatch):
    """The stuck transaction is mined just before its replacement reaches the node (which
    then calls the nonce too low): the payment is the original's, not an error."""
    from golem_dask.payment.ethereum import EthereumPayer
    from golem_dask.payment.sender import Sender

    key, _ = funded_requestor(anvil)
    payee = Wallet.generate().address
    w3 = anvil.web3()
    w3.provider.make_request("evm_setAutomine", [False])
    broadcast = Sender.broadcast

    def mine_first(self, raw, what):
        if len(self.ledger.payments()[0].tx_hashes) >= 2:  # the replacement: the original lands first
            w3.provider.make_request("evm_mine", [])
        return broadcast(self, raw, what)

    monkeypatch.setattr(Sender, "broadcast", mine_first)
    payer = EthereumPayer(anvil.web3(), wallet=Wallet.from_key(key), token_address=anvil.contracts["token"],
                          ledger=Ledger(tmp_path / "ledger.sqlite"), replace_after_s=0.5, poll_interval=0.1,
                          receipt_timeout=60, batch_window_s=0)
    transfer = asyncio.run(payer.pay(payee, Decimal("0.75"), reference="raced"))
    (payment,) = payer.ledger.payments()
    assert transfer.tx_hash == payment.confirmed_hash == payment.tx_hashes[0]
    assert balance(anvil, payee) == Decimal("0.75")


def test_stuck_transaction_is_replaced_with_the_same_nonce(anvil, tmp_path):
    import threading

    from golem_dask.payment.ethereum import EthereumPayer

    key, requestor = funded_requestor(anvil)
    payee = Wallet.generate().address
    w3 = anvil.web3()
    w3.provider.make_request("evm_setAutomine", [False])
    payer = EthereumPayer(anvil.web3(), wallet=Wallet.from_key(key), token_address=anvil.contracts["token"],
                          ledger=Ledger(tmp_path / "ledger.sqlite"), replace_after_s=1.0, poll_interval=0.1,
                          receipt_timeout=60, batch_window_s=0)

    def mine_after_replacement() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            payments = payer.ledger.payments()
            if payments and len(payments[0].tx_hashes) >= 2:
                break
            time.sleep(0.1)
        w3.provider.make_request("evm_mine", [])

    miner = threading.Thread(target=mine_after_replacement)
    miner.start()
    transfer = asyncio.run(payer.pay(payee, Decimal("0.75"), reference="stuck"))
    miner.join()
    (payment,) = payer.ledger.payments()
    assert len(payment.tx_hashes) >= 2, "the ledger keeps the stuck and the replacing hash"
    assert transfer.tx_hash == payment.confirmed_hash == payment.tx_hashes[-1]
    assert balance(anvil, payee) == Decimal("0.75")
    assert w3.eth.get_transaction_count(requestor) == payment.nonce + 1
    from web3.exceptions import TransactionNotFound

    assert w3.eth.get_transaction(payment.tx_hashes[-1])["nonce"] == payment.nonce
    with pytest.raises(TransactionNotFound):  # the node dropped the replaced one
        w3.eth.get_transaction(payment.tx_hashes[0])
