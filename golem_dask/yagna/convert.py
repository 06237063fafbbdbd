"""Between golem-dask's messages and the yagna daemon's JSON.  Pure functions.

Properties go out as JSON numbers (a ``Decimal`` as an int when whole, else a float:
the daemon's constraint matcher compares numbers); proposals, debit notes and invoices
come back as golem-dask's frozen messages; an exe-script of golem-dask commands becomes
the daemon's ``exeScript``.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from golem_dask.errors import ConfigError, ProtocolError
from golem_dask.protocol import properties as P
from golem_dask.protocol.identity import checksum_address
from golem_dask.protocol.messages import (
    DebitNote,
    ExeCommand,
    Invoice,
    Issuer,
    Proposal,
)

#: Where a VM's files live; container paths outside it are refused.
SANDBOX = "/golem/"


def json_value(value: Any) -> Any:
    """A property value as JSON the daemon compares correctly.

    Examples
    --------
    >>> json_value(Decimal("4")), json_value(Decimal("0.5")), json_value((1, Decimal("2")))
    (4, 0.5, [1, 2])
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    return value


def json_properties(props: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): json_value(v) for k, v in props.items()}


def address(value: Any, what: str) -> str:
    """A node id from the daemon (lower case) in checksummed form."""
    try:
        return checksum_address(str(value))
    except (ValueError, ProtocolError) as e:
        raise ProtocolError(f"the daemon sent {what} {value!r}, not an address") from e


def ms(moment: Any) -> int:
    """Milliseconds since the epoch of an RFC 3339 time (0 if absent)."""
    if not moment:
        return 0
    return int(datetime.fromisoformat(str(moment)).timestamp() * 1000)


def proposal(body: Mapping[str, Any], demand_id: str, offer_id: str | None = None) -> Proposal:
    """A provider's proposal from a ``ProposalEvent`` (its id is the daemon's)."""
    return Proposal(
        issuer=Issuer.PROVIDER,
        properties=dict(body.get("properties") or {}),
        constraints=str(body.get("constraints") or "(&)"),
        offer_id=offer_id or str(body["proposalId"]),
        demand_id=demand_id,
        provider_id=address(body.get("issuerId"), "issuer"),
        prev_proposal_id=body.get("prevProposalId"),
        id=str(body["proposalId"]),
        timestamp_ms=ms(body.get("timestamp")),
    )


def decimal(value: Any, what: str) -> Decimal:
    """A finite, non-negative amount or counter from the daemon."""
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise ProtocolError(f"{what} {value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise ProtocolError(f"{what} {value!r} is not a finite amount >= 0")
    return number


def debit_note(body: Mapping[str, Any], usage_vector: Sequence[str]) -> DebitNote:
    """A debit note; its counters are named by the agreement's ``golem.com.usage.vector``."""
    counters = list(body.get("usageCounterVector") or [])
    if usage_vector and len(counters) != len(usage_vector):
        raise ProtocolError(f"debit note {body.get('debitNoteId')} has {len(counters)} counters for "
                            f"{len(usage_vector)} usage names")
    return DebitNote(
        agreement_id=str(body["agreementId"]),
        activity_id=str(body.get("activityId") or ""),
        usage={name: decimal(value, name) for name, value in zip(usage_vector, counters)},
        total_amount_due=decimal(body["totalAmountDue"], "totalAmountDue"),
        issuer_id=address(body.get("issuerId"), "issuer"),
        recipient_id=address(body.get("recipientId"), "recipient"),
        id=str(body["debitNoteId"]),
        timestamp_ms=ms(body.get("timestamp")),
    )


def invoice(body: Mapping[str, Any]) -> Invoice:
    """An invoice.  The daemon's invoices state no usage (empty ``usage``): the
    accountant checks their amount against its own metering instead."""
    return Invoice(
        agreement_id=str(body["agreementId"]),
        activity_ids=tuple(str(a) for a in body.get("activityIds") or ()),
        usage={},
        amount=decimal(body["amount"], "amount"),
        issuer_id=address(body.get("issuerId"), "issuer"),
        recipient_id=address(body.get("recipientId"), "recipient"),
        payee_addr=address(body.get("payeeAddr"), "payee"),
        payer_addr=address(body.get("payerAddr"), "payer"),
        payment_platform=str(body.get("paymentPlatform") or ""),
        id=str(body["invoiceId"]),
        timestamp_ms=ms(body.get("timestamp")),
    )


def tx_hash(details: Any) -> str | None:
    """The transaction hash in a payment's ``details`` (base64 of its 32 bytes).

    Examples
    --------
    >>> tx_hash(base64.b64encode(bytes(range(32))).decode())[:10]
    '0x00010203'
    >>> tx_hash("not base64") is None
    True
    """
    try:
        raw = base64.b64decode(str(details), validate=True)
    except ValueError:
        return None
    return "0x" + raw.hex() if len(raw) == 32 else None


def _container(path: str) -> str:
    if not path.startswith(SANDBOX):
        raise ConfigError(f"{path!r}: paths in a worker's VM must be under {SANDBOX}")
    return "container:" + path


def _data_bytes(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ConfigError("only base64 data: URLs can be written into a VM")
    return base64.b64decode(payload)


def _write_file(path: str, content: bytes) -> dict[str, Any]:
    """A ``run`` that writes ``content`` to ``path`` in the VM (the daemon's transfer
    command takes no inline data)."""
    _container(path)
    directory = path.rsplit("/", 1)[0]
    encoded = base64.b64encode(content).decode()
    script = (f"mkdir -p {shlex.quote(directory)} && printf %s {shlex.quote(encoded)} | base64 -d "
              f"> {shlex.quote(path)} && chmod 600 {shlex.quote(path)}")
    return {"run": {"entry_point": "/bin/sh", "args": ["-c", script]}}


def _transfer(args: Mapping[str, Any]) -> dict[str, Any]:
    if args.get("options"):
        raise ConfigError("yagna providers get no storage credentials (storage_options): their VMs reach only "
                          "the hosts in their outbound whitelist; use public http(s) URLs, or move the data "
                          "through the requestor")
    source, target = str(args.get("from", "")), str(args.get("to", ""))
    if source.startswith("data:"):
        return _write_file(target, _data_bytes(source))
    source, target = (_container(p) if p.startswith("/") else p for p in (source, target))
    for url in (source, target):
        scheme = url.split(":", 1)[0]
        if scheme not in ("container", "http", "https"):
            raise ConfigError(f"{url!r}: a yagna provider's VM moves files only over http(s) (its outbound "
                              "whitelist rarely has S3 or GCS hosts: a manifest asking for outbound access "
                              "(golem.srv.comp.payload) would be needed)")
    return {"transfer": {"from": source, "to": target}}


def exe_script(commands: Sequence[ExeCommand]) -> list[dict[str, Any]]:
    """golem-dask exe-script commands as the daemon's ``exeScript``.

    ``run`` runs its entry point through ``/usr/bin/env`` (which also sets the
    command's environment); a ``transfer`` of a ``data:`` URL becomes a ``run`` writing
    the file (mode 600).

    Examples
    --------
    >>> exe_script([ExeCommand("deploy"), ExeCommand("run", {"entry_point": "dask", "args": ["worker"],
    ...                                                      "env": {"A": "1"}})])
    [{'deploy': {}}, {'run': {'entry_point': '/usr/bin/env', 'args': ['A=1', 'dask', 'worker']}}]
    """
    script: list[dict[str, Any]] = []
    for command in commands:
        args = command.args
        if command.command == "transfer":
            script.append(_transfer(args))
        elif command.command == "run":
            env = [f"{k}={v}" for k, v in dict(args.get("env") or {}).items()]
            script.append({"run": {"entry_point": "/usr/bin/env",
                                   "args": [*env, str(args["entry_point"]), *[str(a) for a in args.get("args", ())]]}})
        elif command.command == "deploy":
            script.append({"deploy": dict(args)})  # a VPN's "net", if any
        else:
            script.append({command.command: {}})
    return script


def usage_vector(props: Mapping[str, Any]) -> list[str]:
    return [str(name) for name in props.get(P.USAGE_VECTOR) or ()]
