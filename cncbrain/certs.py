"""Local TLS: a private CA and the certificates the brain's gRPC servers and clients use.

`make_local_pki(folder)` writes `ca.pem`/`ca.key`, `server.pem`/`server.key` (SANs: localhost,
127.0.0.1, ::1 and any extra hosts) and `client.pem`/`client.key` (for mutual TLS), all with
`cryptography`, EC P-256, keys mode 0600. `server_credentials` and `channel_credentials` turn the
files into gRPC credentials; services take them from their `tls_*` settings, the CLI from
`--tls-ca` / `CNC_TLS_CA` (and `CNC_TLS_CERT` / `CNC_TLS_KEY` for mutual TLS).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cncbrain.errors import CncError


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CNC Brain (local)"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_local_pki(folder: Path, hosts: Iterable[str] = (), days: int = 365, force: bool = False) -> Pki:
    """Create the CA and the server and client certificates in `folder`."""
    pki = Pki(Path(folder))
    if pki.ca.exists() and not force:
        raise CncError(f"{pki.ca} exists; pass --force to replace the local CA and its certificates")
    if days < 1:
        raise CncError("--days must be at least 1")
    pki.folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("CNC Brain local CA")).issuer_name(_name("CNC Brain local CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(pki.folder / "ca.key", ca_key)
    _write_cert(pki.ca, ca_cert)

    def leaf(cn: str, usage: x509.ObjectIdentifier, san_hosts: Iterable[str] | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san_hosts is not None:
            builder = builder.add_extension(_san(san_hosts), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    all_hosts = ["localhost", "127.0.0.1", "::1", *[h for h in hosts if h]]
    server_cert, server_key = leaf("cncbrain-server", ExtendedKeyUsageOID.SERVER_AUTH, dict.fromkeys(all_hosts))
    _write_cert(pki.server_cert, server_cert)
    _write_key(pki.server_key, server_key)
    client_cert, client_key = leaf("cncbrain-client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    _write_cert(pki.client_cert, client_cert)
    _write_key(pki.client_key, client_key)
    return pki


def _read(path: Path | str | None, what: str) -> bytes:
    if path is None:
        raise CncError(f"{what}: no file given")
    p = Path(path)
    if not p.is_file():
        raise CncError(f"{what}: {p} does not exist")
    return p.read_bytes()


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials for a server, or None when no certificate is configured (plaintext)."""
    if cert is None and key is None:
        return None
    pair = [(_read(key, "TLS key"), _read(cert, "TLS certificate"))]
    if client_ca is not None:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca, "TLS client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca: Path | str | None, cert: Path | str | None = None,
                        key: Path | str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA"),
        private_key=_read(key, "TLS client key") if key else None,
        certificate_chain=_read(cert, "TLS client certificate") if cert else None,
    )


RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
"""A brain service that restarts (or whose standby takes over) is back within seconds, on the same
address: a channel tries it again at most 1 s apart. gRPC's defaults (1 s, then ×1.6 up to 120 s,
and the subchannel with its backoff is shared by every channel of the process to that address)
left a caller waiting 1.6-4 s after the service was serving again."""


def client_channel(target: str, *, ca: Path | str | None = None, cert: Path | str | None = None,
                   key: Path | str | None = None, interceptors: list | None = None) -> grpc.aio.Channel:
    """An aio channel to a brain service: TLS when a CA is given (or `CNC_TLS_CA` is set), else
    plaintext; reconnecting quickly (`RECONNECT_OPTIONS`)."""
    ca = ca or os.environ.get("CNC_TLS_CA") or None
    cert = cert or os.environ.get("CNC_TLS_CERT") or None
    key = key or os.environ.get("CNC_TLS_KEY") or None
    options = list(RECONNECT_OPTIONS)
    if ca:
        return grpc.aio.secure_channel(target, channel_credentials(ca, cert, key), options=options,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
