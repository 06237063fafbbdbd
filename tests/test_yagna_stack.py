"""The yagna test stack itself: a real ``yagna`` daemon, offline, paying on a local anvil chain.

Checks that what other tests take for granted holds: two identities behind two app keys, the
requestor's funds as yagna sees them equal to the chain's record, allocations reserving and
releasing them, and a ``close()`` that leaves no process and no directory behind.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psutil
import pytest
from yagna_stack import YagnaStack, subnet, yagna_stack  # noqa: F401

from golem_dask.chain.deploy import token_contract
from golem_dask.chain.units import to_wei
from golem_dask.protocol.identity import checksum_address

pytestmark = pytest.mark.e2e


def payment_status(stack: YagnaStack) -> dict:
    return json.loads(stack.cli("--json", "payment", "status", "--network", stack.network))


def allocation_ids(stack: YagnaStack) -> set[str]:
    with stack.session(stack.requestor_key) as s:
        response = s.get(f"{stack.api_url}/payment-api/v1/allocations", timeout=30)
    response.raise_for_status()
    return {a["allocationId"] for a in response.json()}


def create_allocation(stack: YagnaStack, amount: Decimal):
    timeout = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    body = {"totalAmount": str(amount), "paymentPlatform": stack.platform, "timeout": timeout}
    with stack.session(stack.requestor_key) as s:
        return s.post(f"{stack.api_url}/payment-api/v1/allocations", json=body, timeout=30)


def test_two_identities_behind_two_app_keys(yagna_stack):  # noqa: F811
    identities = {}
    for role, key in (("requestor", yagna_stack.requestor_key), ("provider", yagna_stack.provider_key)):
        with yagna_stack.session(key) as s:
            response = s.get(f"{yagna_stack.api_url}/me", timeout=10)
        assert response.status_code == 200, response.text
        identities[role] = checksum_address(response.json()["identity"])
    assert identities == {"requestor": yagna_stack.requestor_id, "provider": yagna_stack.provider_id}
    assert yagna_stack.requestor_id != yagna_stack.provider_id
    with yagna_stack.session("not-a-key") as s:
        assert s.get(f"{yagna_stack.api_url}/me", timeout=10).status_code == 401


def test_yagna_reports_the_requestors_on_chain_balance(yagna_stack):  # noqa: F811
    # Other tests share the stack and may be paying right now: read the chain on both
    # sides of yagna's answer and accept it only when nothing moved in between.
    for _ in range(20):
        before = yagna_stack.token_balance(yagna_stack.requestor_id)
        status = payment_status(yagna_stack)
        after = yagna_stack.token_balance(yagna_stack.requestor_id)
        if before == after:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the requestor's balance kept changing")
    assert (status["network"], status["token"]) == ("hoodi", "tGLM")
    assert to_wei(Decimal(status["amount"])) == after
    # What the stack funded, less whatever the requestor has sent since.
    token = token_contract(yagna_stack.web3(), yagna_stack.token)
    sent = sum(e["args"]["value"] for e in token.events.Transfer.get_logs(
        from_block=0, argument_filters={"sender": yagna_stack.requestor_id}))
    assert after == to_wei(yagna_stack.fund_tokens) - sent
    assert after > 0


def test_allocation_is_created_and_released(yagna_stack):  # noqa: F811
    response = create_allocation(yagna_stack, Decimal("2.5"))
    assert response.status_code == 201, response.text
    allocation = response.json()
    assert checksum_address(allocation["address"]) == yagna_stack.requestor_id
    assert Decimal(allocation["totalAmount"]) == Decimal("2.5")
    assert Decimal(allocation["remainingAmount"]) == Decimal("2.5")
    assert allocation["allocationId"] in allocation_ids(yagna_stack)

    with yagna_stack.session(yagna_stack.requestor_key) as s:
        url = f"{yagna_stack.api_url}/payment-api/v1/allocations/{allocation['allocationId']}"
        assert s.delete(url, timeout=30).status_code == 200
        assert s.get(url, timeout=30).status_code == 404
        assert s.delete(url, timeout=30).status_code == 410  # already released
    assert allocation["allocationId"] not in allocation_ids(yagna_stack)


def test_allocation_beyond_the_funds_is_refused(yagna_stack):  # noqa: F811
    # yagna checks the balance on anvil: the payments config points it at our chain and token.
    response = create_allocation(yagna_stack, yagna_stack.fund_tokens + 1)
    assert response.status_code == 400, response.text
    assert "Insufficient funds" in response.json()["detail"]


def test_subnet_names_are_fresh():
    names = {subnet() for _ in range(100)}
    assert len(names) == 100
    assert all(name.startswith("t-") for name in names)


def test_close_leaves_no_process_and_no_directory():
    stack = YagnaStack().start()
    try:
        daemon, anvil = psutil.Process(stack.pid), psutil.Process(stack.anvil.pid)
        root = stack.root
        assert root is not None and root.is_dir()
        secrets_ = (stack.requestor_key, stack.provider_key, stack._secret)
        shown = repr(stack) + json.dumps(stack.env())
        assert not [s for s in secrets_ if s in shown]

        stack.restart()
        assert not daemon.is_running()
        daemon = psutil.Process(stack.pid)
        with stack.session(stack.provider_key) as s:
            me = s.get(f"{stack.api_url}/me", timeout=10).json()
        assert checksum_address(me["identity"]) == stack.provider_id
    finally:
        stack.close()
    assert not daemon.is_running()
    assert not anvil.is_running()
    assert not root.exists()
    stack.close()  # a second close is a no-op
    assert repr(stack) == "YagnaStack(stopped)"
    with pytest.raises(RuntimeError, match="closed"):
        stack.start()


def test_a_long_cluster_extends_its_allocation_before_the_daemon_releases_it(yagna_stack):  # noqa: F811
    """The daemon releases an allocation at its timeout, after which nothing is accepted from
    it: the session extends it once half its lifetime has passed."""
    import asyncio

    import dask

    from golem_dask.yagna.api import YagnaDaemon

    def timeout_of(allocation_id: str) -> str:
        with yagna_stack.session(yagna_stack.requestor_key) as s:
            found = s.get(f"{yagna_stack.api_url}/payment-api/v1/allocations/{allocation_id}", timeout=30)
            assert found.status_code == 200, found.text
            return str(found.json()["timeout"])

    async def main() -> tuple[str, str, str]:
        daemon = YagnaDaemon(Decimal(1), yagna_stack.platform, yagna_stack.api_url, yagna_stack.requestor_key)
        await daemon.start()
        try:
            first = await daemon.allocation()
            before = timeout_of(first)
            await asyncio.sleep(2.5)  # past half of its 4 s
            assert await daemon.allocation() == first
            return first, before, timeout_of(first)
        finally:
            await daemon.close()

    with dask.config.set({"golem.yagna.allocation-lifetime": "4s"}):
        allocation, before, after = asyncio.run(main())
    assert after > before  # ISO times of one format order as they read
    assert allocation not in allocation_ids(yagna_stack)  # released at close
