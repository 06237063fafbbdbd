"""TLS between the requestor's scheduler and rented workers, with roles kept apart.

Each cluster makes its own certificate authority, in memory; its key never leaves the
requestor.  It signs one certificate for the scheduler, one for the requestor's own
clients, and one per worker (per agreement), each naming its role in the subject's
organizational unit (``scheduler``, ``client``, ``worker``) and a worker's name in its
common name.  :class:`~golem_dask.scheduler.GolemScheduler` admits a worker certificate
only to the few operations a worker makes, under its own name: a provider's certificate
cannot open a client session (submit tasks, run functions on the scheduler).

A worker's certificate and key are shipped into its sandbox by the exe-script, sealed to
its provider (:mod:`golem_dask.protocol.sealing`), never baked into an image.
"""

from __future__ import annotations

import base64
import datetime
from typing import Any

from distributed.security import Security

from golem_dask.protocol.messages import ExeCommand

TLS_FILES = {"ca": "/golem/tls/ca.pem", "cert": "/golem/tls/cert.pem", "key": "/golem/tls/key.pem"}
TLS_ARGS = ("--tls-ca-file", TLS_FILES["ca"], "--tls-cert", TLS_FILES["cert"], "--tls-key", TLS_FILES["key"])

#: The subject attribute that carries a certificate's role.
ROLE_ATTRIBUTE = "organizationalUnitName"
ROLES = ("scheduler", "client", "worker")
_VALIDITY = datetime.timedelta(days=30)


def _pem(cert: Any, key: Any) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


class CertificateAuthority:
    """A cluster's own CA on an EC P-256 key (an RSA-2048 key takes tens of milliseconds
    to make; these take about one).

    Examples
    --------
    >>> ca = CertificateAuthority()
    >>> cert, key = ca.issue("worker", "golem-0")
    >>> role_of({"subject": ((("commonName", "golem-0"),), (("organizationalUnitName", "worker"),))})
    ('worker', 'golem-0')
    >>> cert.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE KEY" in key
    True
    """

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "golem-dask cluster CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_pem = _pem(self._cert, self._key)[0]

    def __repr__(self) -> str:
        return "<CertificateAuthority (key held in memory)>"

    def __reduce__(self) -> Any:
        raise TypeError("a CertificateAuthority holds a private key and cannot be pickled")

    def issue(self, role: str, name: str) -> tuple[str, str]:
        """A certificate for ``role`` (one of :data:`ROLES`) named ``name``: ``(cert_pem, key_pem)``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        if role not in ROLES:
            raise ValueError(f"role {role!r}: use one of {ROLES}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("golem-dask")]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return _pem(cert, key)

    def security(self) -> Security:
        """The requestor's side: the scheduler's and its clients' certificates, all in memory."""
        scheduler_cert, scheduler_key = self.issue("scheduler", "scheduler")
        client_cert, client_key = self.issue("client", "requestor")
        return Security(
            require_encryption=True,
            tls_ca_file=self.ca_pem,
            tls_scheduler_cert=scheduler_cert, tls_scheduler_key=scheduler_key,
            tls_client_cert=client_cert, tls_client_key=client_key,
        )

    def worker_commands(self, name: str) -> list[ExeCommand]:
        """Transfers putting the CA, and a fresh certificate and key for worker ``name``, into its sandbox."""
        cert, key = self.issue("worker", name)
        files = {"ca": self.ca_pem, "cert": cert, "key": key}
        return [ExeCommand("transfer", {"from": _data_url(files[k]), "to": path}) for k, path in TLS_FILES.items()]


def role_of(peercert: dict[str, Any] | None) -> tuple[str, str] | None:
    """``(role, name)`` from a TLS peer's certificate as ``ssl`` reports it, ``None``
    without one, ``("unknown", name)`` for a certificate that names no role."""
    if not peercert:
        return None
    fields = {key: value for rdn in peercert.get("subject", ()) for key, value in rdn}
    return str(fields.get(ROLE_ATTRIBUTE, "unknown")), str(fields.get("commonName", ""))


def _data_url(text: str) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(text.encode()).decode()
