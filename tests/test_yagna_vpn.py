"""A Dask cluster over the daemon's VPN, the scheduler staying on the requestor's machine.

Workers run in test VMs (:mod:`yagna_vpn`: network namespaces whose only way out is the
daemon's VPN), dial their scheduler at ``127.0.0.1`` in their VM, and reach it through the
VM's backchannel and the tunnels the requestor keeps open to it; the scheduler fetches
results from the workers' VPN addresses through tunnels too; workers exchange data on the
VPN.  The daemon is the real one (:mod:`yagna_stack`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, Scheduler
from distributed.security import Security
from netns_support import unavailable
from test_yagna import leftovers, providers, requestor, subnet  # noqa: F401
from yagna_stack import yagna_stack  # noqa: F401
from yagna_vpn import TestVpn, vpn_unavailable

from golem_dask import GolemCluster
from golem_dask.yagna import backchannel
from golem_dask.yagna.api import YagnaApi
from golem_dask.yagna.vpn import LocalForward, TunnelPool, VpnNetwork, route

pytestmark = pytest.mark.e2e

def _need_vms() -> None:
    reason = vpn_unavailable()
    if reason is not None:
        unavailable(reason)


def _tls_files(security: Security, root: Path) -> list[str]:
    """The worker's TLS options, its certificate and key written to files the VMs read."""
    files = {"ca": security.tls_ca_file, "cert": security.tls_worker_cert, "key": security.tls_worker_key}
    paths = {}
    for name, pem in files.items():
        path = root / f"{name}.pem"
        path.write_text(pem)
        path.chmod(0o600)
        paths[name] = str(path)
    return ["--tls-ca-file", paths["ca"], "--tls-cert", paths["cert"], "--tls-key", paths["key"]]


def test_workers_on_the_vpn_compute_with_a_scheduler_on_the_requestors_machine(yagna_stack, tmp_path):  # noqa: F811
    _need_vms()
    asyncio.run(_compute_over_the_vpn(yagna_stack, tmp_path))


async def _compute_over_the_vpn(stack, tmp_path: Path) -> None:
    api = YagnaApi(stack.api_url, stack.requestor_key)
    await api.start()
    security = Security.temporary()
    undo: list = []
    closers: list = []
    vpn: TestVpn | None = None
    net: VpnNetwork | None = None
    try:
        net = await VpnNetwork.create(api, stack.requestor_id)
        vpn = TestVpn(stack.gsb_url, net.id)
        await vpn.start()
        async with Scheduler(host="127.0.0.1", port=0, protocol="tls", security=security, dashboard=False) as scheduler:
            scheduler_local = scheduler.address.removeprefix("tls://")
            tls = _tls_files(security, tmp_path)
            pools = []
            for _ in range(2):
                ip = net.allocate()
                await net.add_node(stack.provider_id, ip)
                vm = await vpn.add_vm(stack.provider_id, ip)
                pool = TunnelPool(net, ip, 7000, scheduler_local).start()
                pools.append(pool)
                closers.append(pool.close)
                vm.popen([sys.executable, "-c", backchannel.source(), "--host", ip, "--tunnels", "7000",
                          "--scheduler", "8786", "--forward", "9000", "--token", pool.token.hex()])
                forward = await LocalForward(net, ip, 7000, pool.token, 9000).start()
                closers.append(forward.close)
                undo.append(route(f"{ip}:9000", forward.address))
                vm.popen([sys.executable, "-m", "distributed.cli.dask_worker", "tls://127.0.0.1:8786",
                          "--listen-address", f"tls://{ip}:9000", "--no-nanny", "--nthreads", "1",
                          "--no-dashboard", "--name", f"vm-{ip}", *tls])
            async with Client(scheduler.address, security=security, asynchronous=True) as client:
                await asyncio.wait_for(client.wait_for_workers(2), 60)
                workers = sorted(client.scheduler_info()["workers"])
                assert workers == sorted(f"tls://{ip}:9000" for ip in net.nodes)
                x = da.arange(400 * 400, chunks=40_000).reshape(400, 400)
                # The transpose needs every chunk on every worker: data moves between VMs.
                total = await client.compute((x + x.T).sum())
                expected = np.arange(400 * 400).reshape(400, 400)
                assert total == int((expected + expected.T).sum())
                # Chunks of an array made here travel in the graph, scheduler to workers:
                # hundreds of KB through the tunnels, whose messages the daemon may reorder.
                y = np.arange(600 * 600, dtype="int64").reshape(600, 600)
                z = da.from_array(y, chunks=150)
                assert await asyncio.wait_for(client.compute((z + z.T).sum()), 60) == int((y + y.T).sum())
                # Results come back from the workers' VPN addresses (the scheduler gathers them).
                futures = client.map(lambda i: i * i, range(20), workers=workers[:1], pure=False)
                assert await client.gather(futures) == [i * i for i in range(20)]
                assert vpn.frames["between-vms"] > 0
                assert all(pool.joined >= 1 for pool in pools)
    finally:
        for u in undo:
            u()
        for close in closers:
            await close()
        if vpn is not None:
            await vpn.close()
        if net is not None:
            await net.delete()
            listed = await api.call("GET", "/net-api/v2/vpn/net")
            assert net.id not in {n["id"] for n in listed}
        await api.close()


def test_a_cluster_on_the_vpn_computes_and_pays_with_workers_that_cannot_reach_this_machine(
        requestor, subnet, tmp_path):  # noqa: F811
    """``golem.yagna.connectivity: vpn``: each worker runs in a test VM reachable only
    through the daemon's VPN, and ``GolemCluster`` computes and pays as with direct dials."""
    _need_vms()
    stack = requestor
    (provider,) = providers(stack, subnet, tmp_path, gsb_url=stack.gsb_url)
    data = np.arange(600 * 600, dtype="f8").reshape(600, 600)
    with provider, dask.config.set({"golem.yagna.connectivity": "vpn"}):
        with GolemCluster(n_workers=2, market="yagna", budget="1", cpu=1, memory="1GiB") as cluster, \
                Client(cluster) as client:
            assert "(golem.runtime.capabilities=vpn)" in str(cluster.spec.constraints)
            workers = sorted(client.scheduler_info()["workers"])
            assert [w.rpartition(":")[0] for w in workers] == ["tls://192.168.0.2", "tls://192.168.0.3"]
            x = da.from_array(data, chunks=150)  # the graph carries the chunks through the tunnels
            assert float((x + x.T).sum().compute()) == float((data + data.T).sum())
            namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert sum(f"gdvm{os.getpid() % 100000}" in line for line in namespaces.splitlines()) == 2
        bill = cluster.bill()
    assert not provider.errors, provider.errors
    assert [e.status for e in bill.entries] == ["paid", "paid"], bill
    assert all(e.tx_hash for e in bill.entries)
    assert leftovers(stack) == {"allocations": [], "demands": []}
    with stack.session(stack.requestor_key) as s:
        assert s.get(f"{stack.api_url}/net-api/v2/vpn/net", timeout=10).json() == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"gdvm{os.getpid() % 100000}" not in namespaces
