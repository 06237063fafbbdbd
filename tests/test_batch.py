"""Batch payments: one transaction pays many providers, for much less gas per payee."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from anvil_support import anvil  # noqa: F401
from golem_dask.payment.ethereum import EthereumPayer
from golem_dask.payment.ledger import Ledger
from golem_dask.chain.deploy import fund
from golem_dask.protocol.identity import Wallet


def payer(node, tmp_path, batch: bool) -> EthereumPayer:
    wallet = Wallet.generate()
    fund(node.web3(), node.contracts["token"], node.accounts[0], wallet.address, Decimal(1000), 10**19)
    return EthereumPayer(node.web3(), wallet=wallet, token_address=node.contracts["token"],
                         batch_address=node.contracts["batch"] if batch else None,
                         ledger=Ledger(tmp_path / f"ledger-{wallet.address}.sqlite"), batch_window_s=0.05,
                         poll_interval=0.05)


def pay_all(p: EthereumPayer, n: int, amount: Decimal = Decimal("0.01")) -> tuple[list[str], float]:
    payees = [Wallet.generate().address for _ in range(n)]

    async def run() -> None:
        await asyncio.gather(*(p.pay(a, amount, reference=f"{p.address}-{i}") for i, a in enumerate(payees)))

    started = time.perf_counter()
    asyncio.run(run())
    return payees, time.perf_counter() - started


def gas_used(node, p: EthereumPayer, kinds: set[str]) -> int:
    w3 = node.web3()
    return sum(w3.eth.get_transaction_receipt(r.confirmed_hash)["gasUsed"]
               for r in p.ledger.payments() if r.kind in kinds)


def test_batch_pays_exact_amounts_in_one_transaction(anvil, tmp_path):
    p = payer(anvil, tmp_path, batch=True)
    payees, _ = pay_all(p, 5, Decimal("0.25"))
    for a in payees:
        assert asyncio.run(p.balance(a)) == Decimal("0.25")
    kinds = [r.kind for r in p.ledger.payments()]
    assert kinds == ["approve", "batch"]
    (batch,) = [r for r in p.ledger.payments() if r.kind == "batch"]
    assert len(batch.debt_ids) == 5  # the ledger records which debts it settled


def test_without_a_batch_contract_it_pays_one_by_one(anvil, tmp_path):
    p = payer(anvil, tmp_path, batch=False)
    payees, _ = pay_all(p, 3)
    assert [r.kind for r in p.ledger.payments()] == ["transfer"] * 3
    assert all(asyncio.run(p.balance(a)) == Decimal("0.01") for a in payees)


@pytest.mark.parametrize("n", [10, 50])
def test_batch_gas_per_payee_is_about_half_of_single_transfers(anvil, tmp_path, n):
    single = payer(anvil, tmp_path, batch=False)
    pay_all(single, n)
    batched = payer(anvil, tmp_path, batch=True)
    pay_all(batched, n)
    per_single = gas_used(anvil, single, {"transfer"}) / n
    per_batch = gas_used(anvil, batched, {"batch"}) / n
    ratio = per_batch / per_single
    print(f"n={n}: single {per_single:.0f} gas/payee, batch {per_batch:.0f} gas/payee, ratio {ratio:.3f}")
    assert ratio <= (0.52 if n >= 50 else 0.62)


def test_a_batch_address_holding_another_contract_is_refused_before_any_approval(anvil, tmp_path):
    """The payer lets the batch contract move its tokens, so the code there must be ours."""
    from golem_dask.errors import PaymentError
    from golem_dask.chain.deploy import token_contract

    wallet = Wallet.generate()
    fund(anvil.web3(), anvil.contracts["token"], anvil.accounts[0], wallet.address, Decimal(10), 10**19)
    impostor = anvil.contracts["token"]  # a contract, but not the batch payer
    p = EthereumPayer(anvil.web3(), wallet=wallet, token_address=anvil.contracts["token"], batch_address=impostor,
                      ledger=Ledger(tmp_path / "ledger.sqlite"), batch_window_s=0.05, poll_interval=0.05)
    with pytest.raises(PaymentError, match="is not golem-dask's batch contract .* leave golem.payment.batch-address"):
        asyncio.run(p.pay(Wallet.generate().address, Decimal("0.01"), reference="r"))
    token = token_contract(anvil.web3(), anvil.contracts["token"])
    assert token.functions.allowance(wallet.address, impostor).call() == 0


def test_a_contract_whose_code_merely_appears_in_ours_is_refused_too(anvil, tmp_path):
    """A one-byte STOP contract's code is a substring of every build: equality is the rule."""
    from golem_dask.errors import PaymentError

    w3 = anvil.web3()
    # Init code returning one byte of (zeroed) memory as the deployed code: PUSH1 1, PUSH1 0, RETURN.
    created = w3.eth.send_transaction({"from": anvil.accounts[0], "data": "0x60016000f3"})
    stub = w3.eth.wait_for_transaction_receipt(created)["contractAddress"]
    assert bytes(w3.eth.get_code(stub)) == b"\x00"
    wallet = Wallet.generate()
    fund(w3, anvil.contracts["token"], anvil.accounts[0], wallet.address, Decimal(10), 10**19)
    p = EthereumPayer(w3, wallet=wallet, token_address=anvil.contracts["token"], batch_address=stub,
                      ledger=Ledger(tmp_path / "ledger.sqlite"), batch_window_s=0.05, poll_interval=0.05)
    with pytest.raises(PaymentError, match="is not golem-dask's batch contract"):
        asyncio.run(p.pay(Wallet.generate().address, Decimal("0.01"), reference="r"))


def test_a_closing_payer_gathers_payments_arriving_apart_into_one_transaction(anvil, tmp_path):
    """A closing cluster's final invoices arrive a few hundred ms apart: ``linger`` (what
    the cluster calls as it closes, with the number of workers leaving) puts them in one
    batch, sent once both are owed rather than at the end of the window; the usual window
    does not gather them."""
    def two_apart(p: EthereumPayer) -> set[str]:
        async def run() -> set[str]:
            first = asyncio.ensure_future(p.pay(Wallet.generate().address, Decimal("0.01"), reference="a"))
            await asyncio.sleep(0.3)
            second = await p.pay(Wallet.generate().address, Decimal("0.01"), reference="b")
            return {(await first).tx_hash, second.tx_hash}

        return asyncio.run(run())

    assert len(two_apart(payer(anvil, tmp_path, batch=True))) == 2  # the 50 ms window of these tests
    lingering = payer(anvil, tmp_path, batch=True)
    lingering.linger(30.0, 2)
    started = time.monotonic()
    assert len(two_apart(lingering)) == 1
    assert time.monotonic() - started < 15  # not the 30 s window: both had arrived
