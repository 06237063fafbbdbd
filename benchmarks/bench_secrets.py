"""How long sealing a worker's secrets to its provider takes, and opening them there.

A worker's setup exe-script carries its TLS files (CA certificate, its own certificate
and private key, as data: URLs) and its input transfers with storage credentials; every
transfer is sealed to the provider's key (ECDH on secp256k1, HKDF, AES-256-GCM) before it
crosses the hub.  This times sealing one such script on the requestor and opening it on
the provider.  Target: under 1 ms for both together (median of many runs).

    python benchmarks/bench_secrets.py
"""

from __future__ import annotations

import base64
import statistics
import sys
import time

from _common import finish, log, report_targets

TARGET_MS = 1.0


def script() -> list:
    from golem_dask.protocol.messages import ExeCommand

    pem = "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(bytes(700)).decode() + "\n-----END CERTIFICATE-----\n"
    data = "data:application/octet-stream;base64," + base64.b64encode(pem.encode()).decode()
    options = {"key": "AKIAEXAMPLEEXAMPLE", "secret": "s" * 40, "client_kwargs": {"endpoint_url": "https://s3.example"}}
    return ([ExeCommand("transfer", {"from": data, "to": f"/golem/tls/{n}.pem"}) for n in ("ca", "cert", "key")]
            + [ExeCommand("transfer", {"from": f"s3://bucket/part-{i}.parquet", "to": f"/golem/input/part-{i}.parquet",
                                       "options": options}) for i in range(2)])


def main() -> int:
    from golem_dask.protocol.identity import Wallet
    from golem_dask.protocol.sealing import activity_aad, open_command, seal_commands

    provider = Wallet.generate()
    commands = script()
    aad = activity_aad("a" * 32, "b" * 32)
    key = provider.public_key
    for _ in range(50):  # warm-up: imports, first key setup
        [open_command(c.args, provider.unseal, aad) for c in seal_commands(commands, key, aad)]
    seal_ms, open_ms = [], []
    for _ in range(500):
        t0 = time.perf_counter()
        sealed = seal_commands(commands, key, aad)
        t1 = time.perf_counter()
        opened = [open_command(c.args, provider.unseal, aad) for c in sealed]
        t2 = time.perf_counter()
        assert opened == [dict(c.args) for c in commands]
        seal_ms.append((t1 - t0) * 1000)
        open_ms.append((t2 - t1) * 1000)
    both = [a + b for a, b in zip(seal_ms, open_ms)]
    log(f"one setup script of {len(commands)} transfers (3 TLS files, 2 inputs with credentials):")
    log(f"  seal on the requestor:  median {statistics.median(seal_ms):.3f} ms")
    log(f"  open on the provider:   median {statistics.median(open_ms):.3f} ms")
    log(f"  both:                   median {statistics.median(both):.3f} ms, 95th percentile "
        f"{sorted(both)[int(len(both) * 0.95)]:.3f} ms")
    targets = [{"name": f"seal + open one exe-script < {TARGET_MS:g} ms", "value": statistics.median(both),
                "pass": statistics.median(both) < TARGET_MS}]
    report_targets(targets)
    return finish(sys.argv[1] if len(sys.argv) > 1 else None, targets)


if __name__ == "__main__":
    sys.exit(main())
