"""Certificates that keep roles apart: a provider's worker certificate joins the scheduler
as that worker and nothing else; only the requestor's client certificate opens a client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from distributed import Client, Worker
from distributed.security import Security

from golem_dask.scheduler import GolemScheduler
from golem_dask.tls import TLS_FILES, CertificateAuthority, role_of


def worker_security(ca: CertificateAuthority, name: str) -> Security:
    cert, key = ca.issue("worker", name)
    return Security(require_encryption=True, tls_ca_file=ca.ca_pem, tls_worker_cert=cert, tls_worker_key=key,
                    tls_client_cert=cert, tls_client_key=key)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


async def scheduler(ca: CertificateAuthority) -> GolemScheduler:
    return await GolemScheduler(host="127.0.0.1", port=0, dashboard_address=None, protocol="tls",
                                security=ca.security())


def test_a_worker_certificate_joins_as_its_own_worker_and_computes() -> None:
    async def main() -> int:
        ca = CertificateAuthority()
        async with await scheduler(ca) as s:
            async with Worker(s.address, name="golem-0", security=worker_security(ca, "golem-0"), nthreads=1):
                async with Client(s.address, security=ca.security(), asynchronous=True) as client:
                    return await client.submit(lambda x: x + 1, 41)

    assert run(main()) == 42


def test_a_worker_certificate_cannot_open_a_client_session() -> None:
    async def main() -> str:
        ca = CertificateAuthority()
        async with await scheduler(ca) as s:
            with pytest.raises(Exception) as info:
                async with Client(s.address, security=worker_security(ca, "golem-0"), asynchronous=True,
                                  timeout=5) as client:
                    await client.run_on_scheduler(lambda: "code ran on the requestor's machine")
            return repr(info.value)

    assert "code ran" not in run(main())


def test_a_worker_certificate_cannot_call_other_scheduler_operations() -> None:
    from distributed.core import rpc

    async def main() -> list[str]:
        ca = CertificateAuthority()
        refused = []
        async with await scheduler(ca) as s:
            async with rpc(s.address, connection_args=worker_security(ca, "golem-0").get_connection_args("worker")) as r:
                for op, kwargs in (("run_function", {"function": b""}), ("retire_workers", {}), ("get_logs", {}),
                                   ("terminate", {})):
                    with pytest.raises(PermissionError, match=f"may not call '{op}'"):
                        await getattr(r, op)(**kwargs)
                    refused.append(op)
            assert s.status.name == "running"  # "terminate" did not close it
        return refused

    assert run(main()) == ["run_function", "retire_workers", "get_logs", "terminate"]


def test_a_worker_certificate_cannot_register_another_worker_name() -> None:
    async def main() -> tuple[list[str], int]:
        ca = CertificateAuthority()
        async with await scheduler(ca) as s:
            with pytest.raises(Exception):
                async with Worker(s.address, name="golem-1", security=worker_security(ca, "golem-0"), nthreads=1,
                                  death_timeout=3):
                    pass
            return [str(ws.name) for ws in s.workers.values()], len(s.clients)

    names, _ = run(main())
    assert names == []


def test_a_certificate_of_another_ca_is_refused() -> None:
    async def main() -> None:
        ours, theirs = CertificateAuthority(), CertificateAuthority()
        async with await scheduler(ours) as s:
            with pytest.raises(Exception):
                async with Client(s.address, security=theirs.security(), asynchronous=True, timeout=3):
                    pass

    run(main())


def test_role_of_reads_the_subject() -> None:
    assert role_of(None) is None
    assert role_of({"subject": ((("commonName", "x"),),)}) == ("unknown", "x")
    assert set(TLS_FILES) == {"ca", "cert", "key"} and all(Path(p).is_absolute() for p in TLS_FILES.values())
