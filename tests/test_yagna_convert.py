"""The yagna backend's pure parts: JSON in and out, exe-scripts, payments, the accountant's
check of invoices that state no usage."""

from __future__ import annotations

import base64
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from golem_dask.errors import ConfigError, ProtocolError
from golem_dask.payment.accountant import (
    AgreementAccount,
    Tolerance,
    check_amount,
    max_due,
)
from golem_dask.protocol import properties as P
from golem_dask.protocol.identity import checksum_address
from golem_dask.protocol.messages import Agreement, ExeCommand, Issuer, Proposal
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.tls import CertificateAuthority
from golem_dask.yagna import convert
from golem_dask.yagna.api import amount_text
from golem_dask.yagna.payer import paid_for

PROVIDER = "0x6aed10b46b63ec833d816436f11a50a1649c73d6"
REQUESTOR = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8"


def test_a_proposal_event_becomes_a_provider_proposal_with_a_checksummed_issuer() -> None:
    body = {"properties": {"golem.inf.cpu.threads": 2}, "constraints": "(&)", "proposalId": "R-1",
            "issuerId": PROVIDER, "state": "Initial", "timestamp": "2026-12-01T17:05:13.148478096Z"}
    proposal = convert.proposal(body, "demand-1")
    assert (proposal.id, proposal.offer_id, proposal.issuer) == ("R-1", "R-1", Issuer.PROVIDER)
    assert proposal.provider_id == checksum_address(PROVIDER) != PROVIDER
    assert proposal.timestamp_ms == 1796144713148
    with pytest.raises(ProtocolError, match="not an address"):
        convert.proposal({**body, "issuerId": "nobody"}, "demand-1")


def test_debit_notes_name_their_counters_by_the_agreement_vector_and_refuse_bad_numbers() -> None:
    body = {"debitNoteId": "d1", "agreementId": "g1", "activityId": "a1", "totalAmountDue": "0.0123",
            "usageCounterVector": [60.0, 30.5], "issuerId": PROVIDER, "recipientId": REQUESTOR}
    note = convert.debit_note(body, [P.USAGE_DURATION_SEC, P.USAGE_CPU_SEC])
    assert note.usage == {P.USAGE_DURATION_SEC: Decimal("60.0"), P.USAGE_CPU_SEC: Decimal("30.5")}
    assert note.total_amount_due == Decimal("0.0123")
    for bad in ("NaN", "-1", "Infinity", "lots"):
        with pytest.raises(ProtocolError):
            convert.debit_note({**body, "totalAmountDue": bad}, [P.USAGE_DURATION_SEC, P.USAGE_CPU_SEC])
    with pytest.raises(ProtocolError, match="2 counters for 1 usage names"):
        convert.debit_note(body, [P.USAGE_CPU_SEC])


def test_an_invoice_states_no_usage() -> None:
    body = {"invoiceId": "i1", "agreementId": "g1", "activityIds": ["a1"], "amount": "1.25", "issuerId": PROVIDER,
            "recipientId": REQUESTOR, "payeeAddr": PROVIDER, "payerAddr": REQUESTOR,
            "paymentPlatform": "erc20-hoodi-tglm"}
    invoice = convert.invoice(body)
    assert invoice.usage == {} and invoice.amount == Decimal("1.25") and invoice.activity_ids == ("a1",)


def test_exe_scripts_run_through_env_and_write_data_urls_with_the_vm_shell(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    tls = ca.worker_commands("golem-0")
    script = convert.exe_script([ExeCommand("deploy"), ExeCommand("start"), *tls,
                                 ExeCommand("transfer", {"from": "https://example.org/a.csv", "to": "/golem/in/a.csv"}),
                                 ExeCommand("run", {"entry_point": "dask", "args": ["worker", "tls://h:1"],
                                                    "env": {"GOLEM_AGREEMENT_ID": "g"}})])
    assert script[:2] == [{"deploy": {}}, {"start": {}}]
    assert script[-2] == {"transfer": {"from": "https://example.org/a.csv", "to": "container:/golem/in/a.csv"}}
    assert script[-1] == {"run": {"entry_point": "/usr/bin/env",
                                  "args": ["GOLEM_AGREEMENT_ID=g", "dask", "worker", "tls://h:1"]}}
    # The file-writing commands really write the files' bytes (run here, /golem mapped to tmp_path).
    for command, original in zip(script[2:5], tls):
        run = command["run"]
        assert run["entry_point"] == "/bin/sh"
        subprocess.run([run["entry_point"], *[a.replace("/golem/", f"{tmp_path}/") for a in run["args"]]], check=True)
        written = tmp_path / original.args["to"].removeprefix("/golem/")
        assert written.read_bytes() == base64.b64decode(original.args["from"].split(",", 1)[1])
        assert written.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("command", "fix"), [
    (ExeCommand("transfer", {"from": "s3://bucket/a", "to": "/golem/a"}), "http"),
    (ExeCommand("transfer", {"from": "https://x/a", "to": "/golem/a", "options": {"key": "k"}}), "storage_options"),
    (ExeCommand("transfer", {"from": "https://x/a", "to": "/etc/passwd"}), "under /golem/"),
    (ExeCommand("transfer", {"from": "file:///etc/passwd", "to": "/golem/a"}), "http"),
])
def test_transfers_a_vm_cannot_make_fail_before_anything_is_sent(command: ExeCommand, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        convert.exe_script([command])


def test_amounts_go_out_as_plain_decimals_and_tx_hashes_come_back_from_details() -> None:
    assert amount_text(Decimal("0.000000000000000001")) == "0.000000000000000001"
    assert amount_text(Decimal(5)) == "5"
    tx = bytes.fromhex("f1fbb021d49df66eb68e8a77aa963067d0b0371789bdd29dd663e4d384d331bc")
    assert convert.tx_hash(base64.b64encode(tx).decode()) == "0x" + tx.hex()
    assert convert.tx_hash(base64.b64encode(b"short").decode()) is None


def test_payments_count_for_an_agreement_by_its_own_share_and_its_activities() -> None:
    tx1, tx2 = (base64.b64encode(bytes([i]) * 32).decode() for i in (1, 2))
    payments = [
        {"payeeAddr": PROVIDER, "details": tx1, "agreementPayments": [],
         "activityPayments": [{"activityId": "a1", "amount": "0.5"}, {"activityId": "other", "amount": "9"}]},
        {"payeeAddr": PROVIDER, "details": tx2, "agreementPayments": [{"agreementId": "g1", "amount": "0.75"}],
         "activityPayments": []},
        {"payeeAddr": REQUESTOR, "details": tx2, "agreementPayments": [{"agreementId": "g1", "amount": "100"}],
         "activityPayments": []},
    ]
    total, last = paid_for(payments, "g1", ["a1"], PROVIDER)
    assert total == Decimal("1.25") and last == "0x" + "02" * 32
    assert paid_for(payments, "g2", [], PROVIDER) == (Decimal(0), None)


def _account(duration: float, cpu: str) -> AgreementAccount:
    coeffs = {P.PRICING_MODEL: "linear", P.USAGE_VECTOR: [P.USAGE_DURATION_SEC, P.USAGE_CPU_SEC],
              P.LINEAR_COEFFS: [0.0001, 0.0002, 0.0]}
    offer = Proposal(Issuer.PROVIDER, coeffs, "(&)", "o", "d", PROVIDER)
    demand = Proposal(Issuer.REQUESTOR, {P.CPU_THREADS: 2, P.MEM_GIB: 1}, "(&)", "o", "d", PROVIDER)
    agreement = Agreement("g1", demand, offer, REQUESTOR, PROVIDER, 0)
    account = AgreementAccount(agreement, LinearPricing.from_properties(coeffs), "golem-0", 2,
                               started=1000.0, stopped=1000.0 + duration)
    account.observed_cpu_sec = Decimal(cpu)
    return account


def test_an_invoice_without_usage_may_ask_at_most_what_our_metering_allows() -> None:
    account = _account(60, "30")
    most = max_due(account, Tolerance())
    assert most > 0
    assert check_amount(most, account, Tolerance()) is None
    assert check_amount(most / 2, account, Tolerance()) is None
    reason = check_amount(most + Decimal("0.000001"), account, Tolerance())
    assert reason is not None and "exceeds what our metering allows" in reason
    assert check_amount(Decimal("9.5"), account, Tolerance()) is not None
