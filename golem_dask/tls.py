"""TLS between the requestor's scheduler and rented workers.

The certificates are made fresh for each cluster, in memory, and shipped into each
worker's sandbox by the exe-script (never baked into an image).
"""

from __future__ import annotations

import base64

from distributed.security import Security

from golem_dask.protocol.messages import ExeCommand

TLS_FILES = {"ca": "/golem/tls/ca.pem", "cert": "/golem/tls/cert.pem", "key": "/golem/tls/key.pem"}
TLS_ARGS = ("--tls-ca-file", TLS_FILES["ca"], "--tls-cert", TLS_FILES["cert"], "--tls-key", TLS_FILES["key"])


def temporary_security() -> Security:
    """A fresh self-signed certificate for scheduler, workers and client, in memory.

    Like ``Security.temporary()`` but with an EC P-256 key: an RSA-2048 key takes tens
    of milliseconds to make, on every cluster start.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "golem-dask")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("golem-dask")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return Security(
        require_encryption=True,
        tls_ca_file=cert_pem,
        tls_scheduler_cert=cert_pem, tls_scheduler_key=key_pem,
        tls_worker_cert=cert_pem, tls_worker_key=key_pem,
        tls_client_cert=cert_pem, tls_client_key=key_pem,
    )


def _data_url(text: str) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(text.encode()).decode()


def tls_commands(security: Security) -> list[ExeCommand]:
    """Ship the worker's temporary certificate and key into the sandbox (never the image)."""
    files = {k: getattr(security, attr) for k, attr in (("ca", "tls_ca_file"), ("cert", "tls_worker_cert"), ("key", "tls_worker_key"))}
    return [ExeCommand("transfer", {"from": _data_url(str(files[k])), "to": path}) for k, path in TLS_FILES.items()]
