"""EthereumPayer and Wallet on the embedded devnet."""

from __future__ import annotations

import asyncio
import copy
import logging
import pickle
import secrets
from decimal import Decimal

import pytest
from web3.logs import DISCARD

from golem_dask.errors import ConfigError, PaymentError
from golem_dask.chain.units import to_wei
from golem_dask.payment.base import Payer
from golem_dask.chain.devnet import Devnet
from golem_dask.payment.ethereum import EthereumPayer
from golem_dask.protocol.identity import Wallet


@pytest.fixture(scope="module")
def devnet() -> Devnet:
    return Devnet.shared()


def token_wei(devnet: Devnet, address: str) -> int:
    with devnet.lock:
        return devnet.token.functions.balanceOf(address).call()


# --- Wallet -------------------------------------------------------------------------


def test_wallet_is_not_picklable_or_copyable() -> None:
    wallet = Wallet.generate()
    with pytest.raises(TypeError, match="private key"):
        pickle.dumps(wallet)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(wallet, protocol=protocol)
    with pytest.raises(TypeError):
        copy.deepcopy({"wallet": wallet})
    with pytest.raises(TypeError):
        pickle.dumps(EthereumPayer.embedded(Decimal(1)))


def test_wallet_from_key_and_signing() -> None:
    from eth_account import Account

    key = secrets.token_hex(32)
    wallet = Wallet.from_key("0x" + key)
    assert wallet.address == Account.from_key(key).address
    assert Wallet.from_key(bytes.fromhex(key)) == wallet
    raw = wallet.sign_transaction(
        {
            "from": wallet.address,
            "nonce": 3,
            "gas": 21_000,
            "maxFeePerGas": 2 * 10**9,
            "maxPriorityFeePerGas": 10**9,
            "chainId": 1337,
            "to": Wallet.generate().address,
            "value": 1,
            "data": b"",
        }
    )
    assert Account.recover_transaction(raw) == wallet.address
    with pytest.raises(ValueError, match="this wallet is"):
        wallet.sign_transaction({"from": Wallet.generate().address, "nonce": 0})


@pytest.mark.parametrize("bad", ["", "0x1234", "zz" * 32, "00" * 32, b"\x01" * 31, 12345])
def test_wallet_from_key_rejects_malformed_keys(bad: object) -> None:
    with pytest.raises(ConfigError, match="malformed private key"):
        Wallet.from_key(bad)  # type: ignore[arg-type]


def test_wallet_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    key = secrets.token_hex(32)
    monkeypatch.setenv("GD_TEST_KEY", key)
    assert Wallet.from_env("GD_TEST_KEY") == Wallet.from_key(key)

    monkeypatch.delenv("GD_TEST_KEY")
    with pytest.raises(ConfigError, match="GD_TEST_KEY is not set"):
        Wallet.from_env("GD_TEST_KEY")

    malformed = key[:-1] + "g"  # one typo: still almost the whole key
    monkeypatch.setenv("GD_TEST_KEY", malformed)
    with pytest.raises(ConfigError, match="GD_TEST_KEY does not hold a valid") as info:
        Wallet.from_env("GD_TEST_KEY")
    assert key[:-1] not in str(info.value)


# --- EthereumPayer --------------------------------------------------------------------


def test_embedded_payer_knows_its_address_before_start() -> None:
    payer = EthereumPayer.embedded(Decimal(3))
    assert isinstance(payer, Payer)
    assert payer.platform == "erc20-devnet-glm"
    assert payer.address.startswith("0x") and len(payer.address) == 42
    assert not payer._session.started  # nothing touched the chain yet
    assert repr(payer) == (
        f"EthereumPayer(platform='erc20-devnet-glm', address='{payer.address}')"
    )


def test_concurrent_pays_are_exact(devnet: Devnet) -> None:
    payer = EthereumPayer.embedded(Decimal(10))
    alice, bob = Wallet.generate().address, Wallet.generate().address
    amount_a, amount_b = Decimal("1.000000000000000001"), Decimal("2.5")

    async def main() -> tuple:
        # Both pays race the lazy start too.
        return await asyncio.gather(
            payer.pay(alice, amount_a, reference="inv-a"),
            payer.pay(bob, amount_b, reference="inv-b"),
        )

    t_a, t_b = asyncio.run(main())
    assert (t_a.payee, t_a.amount_wei) == (alice, 1_000_000_000_000_000_001)
    assert (t_b.payee, t_b.amount_wei) == (bob, 2_500_000_000_000_000_000)
    assert token_wei(devnet, alice) == to_wei(amount_a)
    assert token_wei(devnet, bob) == to_wei(amount_b)
    # Funded exactly once, then debited by exactly the sum.
    assert token_wei(devnet, payer.address) == to_wei(Decimal(10) - amount_a - amount_b)
    assert asyncio.run(payer.balance(payer.address)) == Decimal(10) - amount_a - amount_b
    assert asyncio.run(payer.balance(alice)) == amount_a

    # Each payment is on chain, from the requestor, with the token's Transfer event.  The
    # devnet has the batch contract, so debts owed at the same moment share one transaction.
    for transfer in (t_a, t_b):
        assert transfer.tx_hash.startswith("0x") and len(transfer.tx_hash) == 66
        with devnet.lock:
            tx = payer.w3.eth.get_transaction(transfer.tx_hash)
            receipt = payer.w3.eth.get_transaction_receipt(transfer.tx_hash)
            events = payer.token.events.Transfer().process_receipt(receipt, errors=DISCARD)
        assert tx["from"] == payer.address and tx["to"] in (devnet.token_address, devnet.batch_address)
        assert receipt["status"] == 1
        assert receipt["blockNumber"] == transfer.block_number
        (event,) = [e for e in events if e["args"]["receiver"] == transfer.payee]
        assert event["address"] == devnet.token_address
        assert event["args"] == {
            "sender": payer.address,
            "receiver": transfer.payee,
            "value": transfer.amount_wei,
        }
    assert t_a.tx_hash == t_b.tx_hash  # one batch for both
    with devnet.lock:
        assert payer.w3.eth.get_transaction(t_a.tx_hash)["to"] == devnet.batch_address


def test_concurrent_starts_fund_once(devnet: Devnet) -> None:
    payer = EthereumPayer.embedded(Decimal("4.2"), eth_wei=10**16)

    async def main() -> list:
        return await asyncio.gather(*(payer.balance(payer.address) for _ in range(5)))

    assert asyncio.run(main()) == [Decimal("4.2")] * 5
    assert asyncio.run(payer.eth_balance(payer.address)) == 10**16
    assert devnet.token_balance(payer.address) == Decimal("4.2")


def test_paying_more_than_the_balance_raises(devnet: Devnet) -> None:
    payer = EthereumPayer.embedded(Decimal(1))
    payee = Wallet.generate().address
    with pytest.raises(PaymentError, match="balance") as info:
        asyncio.run(payer.pay(payee, Decimal("1.5"), reference="inv-too-much"))
    assert "inv-too-much" in str(info.value)
    assert token_wei(devnet, payer.address) == to_wei(Decimal(1))
    assert token_wei(devnet, payee) == 0
    # The failed attempt consumed no nonce: the next payment still goes through.
    transfer = asyncio.run(payer.pay(payee, Decimal(1), reference="inv-ok"))
    assert transfer.amount_wei == to_wei(Decimal(1))
    assert token_wei(devnet, payer.address) == 0


def test_gas_is_paid_in_eth(devnet: Devnet) -> None:
    payer = EthereumPayer.embedded(Decimal(1), eth_wei=10**17)
    transfer = asyncio.run(payer.pay(Wallet.generate().address, Decimal(1), reference="g"))
    with devnet.lock:
        receipt = devnet.w3.eth.get_transaction_receipt(transfer.tx_hash)
    spent = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert asyncio.run(payer.eth_balance(payer.address)) == 10**17 - spent


def test_invalid_payments_are_refused_before_the_chain() -> None:
    payer = EthereumPayer.embedded(Decimal(1))
    good = Wallet.generate().address
    with pytest.raises(PaymentError, match="not a valid Ethereum address"):
        asyncio.run(payer.pay("0x1234", Decimal(1), reference="r"))
    with pytest.raises(PaymentError, match="positive"):
        asyncio.run(payer.pay(good, Decimal(0), reference="r"))
    with pytest.raises(PaymentError, match="more than 18 decimals"):
        asyncio.run(payer.pay(good, Decimal("1e-19"), reference="r"))
    with pytest.raises(TypeError, match="float"):
        asyncio.run(payer.pay(good, 0.1, reference="r"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="float"):
        EthereumPayer.embedded(1.5)  # type: ignore[arg-type]
    assert not payer._session.started


def test_payer_on_a_devnet_with_explicit_wallet(devnet: Devnet) -> None:
    wallet = Wallet.generate()
    devnet.fund(wallet.address, Decimal(2))
    payer = EthereumPayer(devnet, wallet=wallet)
    # Synchronous access starts the payer without an event loop.
    assert payer.token.address == devnet.token_address
    assert payer.chain_id == devnet.chain_id
    payee = Wallet.generate().address
    transfer = asyncio.run(payer.pay(payee, Decimal("0.75"), reference="r"))
    assert token_wei(devnet, payee) == transfer.amount_wei == to_wei(Decimal("0.75"))


def test_close_is_idempotent_and_final() -> None:
    payer = EthereumPayer.embedded(Decimal(1))

    async def main() -> None:
        await payer.start()
        await payer.close()
        await payer.close()
        with pytest.raises(PaymentError, match="closed"):
            await payer.pay(Wallet.generate().address, Decimal(1), reference="late")

    asyncio.run(main())


def test_private_key_never_leaks(devnet: Devnet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, web3's and eth-tester's included
    key = secrets.token_hex(32)
    wallet = Wallet.from_key(key)
    devnet.fund(wallet.address, Decimal(1))
    payer = EthereumPayer(devnet, wallet=wallet)
    payee = Wallet.generate().address

    asyncio.run(payer.pay(payee, Decimal("0.5"), reference="ok"))
    with pytest.raises(PaymentError) as info:
        asyncio.run(payer.pay(payee, Decimal(5), reference="too-much"))

    error_texts = [str(info.value), repr(info.value)]
    cause = info.value.__cause__
    while cause is not None:
        error_texts.append(str(cause))
        cause = cause.__cause__
    texts = [repr(wallet), str(wallet), repr(payer), str(payer), *error_texts, caplog.text]
    assert "paid 0.5 tokens" in caplog.text  # the capture really saw our logs
    for variant in (key, key.upper(), "0x" + key):
        for text in texts:
            assert variant not in text
    # Nor as a decimal integer, in case something printed the key as a number.
    assert str(int(key, 16)) not in caplog.text


def test_wallet_from_an_encrypted_keystore(tmp_path) -> None:
    import json

    from eth_account import Account

    from golem_dask.errors import ConfigError

    key = "22" * 32
    (tmp_path / "ks.json").write_text(json.dumps(Account.encrypt(key, "correct horse")))
    env = {"KS_PASSWORD": "correct horse"}
    wallet = Wallet.from_keystore(tmp_path / "ks.json", "KS_PASSWORD", environ=env)
    assert wallet.address == Wallet.from_key(key).address
    with pytest.raises(ConfigError) as info:
        Wallet.from_keystore(tmp_path / "ks.json", "KS_PASSWORD", environ={"KS_PASSWORD": "wrong"})
    assert "wrong password" in str(info.value) and key not in str(info.value)
    with pytest.raises(ConfigError, match="KS_MISSING"):
        Wallet.from_keystore(tmp_path / "ks.json", "KS_MISSING", environ={})
