"""Local TLS: a private CA and the certificates the brain's gRPC servers, its NATS servers and their
clients use.

`make_local_pki(folder)` writes `ca.pem`/`ca.key`, `server.pem`/`server.key` (SANs: localhost,
127.0.0.1, ::1 and any extra hosts) and `client.pem`/`client.key` (for mutual TLS), all with
`cryptography`, EC P-256, keys mode 0600. `server_credentials` and `channel_credentials` turn the
files into gRPC credentials; services take them from their `tls_*` settings, the CLI from
`--tls-ca` / `CNC_TLS_CA` (and `CNC_TLS_CERT` / `CNC_TLS_KEY` for mutual TLS).

`ensure_nats_certs(folder, nodes)` issues each NATS server (node) its certificate from the CA in
`folder` (made when missing): `nats-<node>.pem`/`.key`, SANs the node's name, its extra hosts and
loopback, usable as server (clients, routes) and as client (the routes it solicits, verified by
the other nodes). `nats_tls_context` is the client side: an `ssl.SSLContext` that trusts the CA
and checks the server's name.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
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


def _ca_cert(ca_key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
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


def _new_ca(pki: Pki, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    pki.folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_cert = _ca_cert(ca_key, days)
    _write_key(pki.folder / "ca.key", ca_key)
    _write_cert(pki.ca, ca_cert)
    return ca_cert, ca_key


def _load_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
        key = serialization.load_pem_private_key((pki.folder / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CncError(f"the local CA is incomplete: {exc.filename} does not exist "
                       f"(make a new one with `cncbrain certs --out {pki.folder} --force`)") from None
    except ValueError as exc:
        raise CncError(f"the local CA in {pki.folder} cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CncError(f"{pki.folder / 'ca.key'} is not an EC private key")
    return cert, key


def _leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, usages: list[x509.ObjectIdentifier],
          san_hosts: Iterable[str] | None, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    now = dt.datetime.now(dt.UTC)
    key = _key()
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san_hosts is not None:
        builder = builder.add_extension(_san(san_hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def make_local_pki(folder: Path, hosts: Iterable[str] = (), days: int = 365, force: bool = False) -> Pki:
    """Create the CA and the server and client certificates in `folder`."""
    pki = Pki(Path(folder))
    if pki.ca.exists() and not force:
        raise CncError(f"{pki.ca} exists; pass --force to replace the local CA and its certificates")
    if days < 1:
        raise CncError("--days must be at least 1")
    ca = _new_ca(pki, days)
    all_hosts = [*LOOPBACK, *[h for h in hosts if h]]
    server_cert, server_key = _leaf(ca, "cncbrain-server", [ExtendedKeyUsageOID.SERVER_AUTH],
                                    dict.fromkeys(all_hosts), days)
    _write_cert(pki.server_cert, server_cert)
    _write_key(pki.server_key, server_key)
    client_cert, client_key = _leaf(ca, "cncbrain-client", [ExtendedKeyUsageOID.CLIENT_AUTH], None, days)
    _write_cert(pki.client_cert, client_cert)
    _write_key(pki.client_key, client_key)
    return pki


@dataclass(frozen=True)
class NatsCert:
    """A NATS server's (node's) certificate and key, issued by the CA in `folder`."""

    folder: Path
    node: str

    @property
    def cert(self) -> Path:
        return self.folder / f"nats-{self.node}.pem"

    @property
    def key(self) -> Path:
        return self.folder / f"nats-{self.node}.key"

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's SAN names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def check_node(node: str) -> None:
    if not node or not all(c.isalnum() or c in "-_." for c in node) or node.startswith("."):
        raise CncError(f"NATS node name {node!r}: letters, digits, '-', '_' and '.' only "
                       "(it names the certificate's files and is its first DNS name)")


def ensure_nats_certs(folder: Path, nodes: dict[str, list[str]], days: int = 365, renew_within_days: int = 30,
                      force: bool = False, loopback: bool = True) -> list[NatsCert]:
    """Each NATS node's certificate in `folder` (`nats-<node>.pem`/`.key`), issued by the CA there
    (created when the folder has none). SANs: the node's name, its extra `hosts` and loopback. A
    certificate is kept while it is valid beyond `renew_within_days`, names every host asked for
    and was issued by this CA; else (or with `force`) the node gets a new key and certificate.
    `loopback=False` leaves loopback out (a node only ever reached by its name)."""
    if days < 1:
        raise CncError("--days must be at least 1")
    pki = Pki(Path(folder))
    ca = _load_ca(pki) if pki.ca.exists() else _new_ca(pki, max(days, 3650))
    ca_cert = ca[0]
    out = []
    for node, hosts in nodes.items():
        check_node(node)
        wanted = list(dict.fromkeys([node, *[h for h in hosts if h], *(LOOPBACK if loopback else ())]))
        issued = NatsCert(pki.folder, node)
        if not force and issued.cert.is_file() and issued.key.is_file():
            current = x509.load_pem_x509_certificate(issued.cert.read_bytes())
            fresh = current.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=renew_within_days)
            if fresh and current.issuer == ca_cert.subject and set(wanted) <= set(cert_hosts(current)) \
                    and _signed_by(current, ca_cert):
                out.append(issued)
                continue
        cert, key = _leaf(ca, f"nats-{node}", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                          wanted, days)
        _write_key(issued.key, key)
        _write_cert(issued.cert, cert)
        out.append(issued)
    return out


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def nats_tls_context(ca: Path | str, cert: Path | str | None = None, key: Path | str | None = None) -> ssl.SSLContext:
    """A NATS client's TLS: trusts only the CA in `ca`, checks the server's name against its
    certificate; with `cert`/`key`, presents a client certificate (a server with `verify`)."""
    ca_path = Path(ca)
    if not ca_path.is_file():
        raise CncError(f"NATS TLS CA: {ca_path} does not exist")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_path))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert or key:
        if not (cert and key):
            raise CncError("NATS TLS client certificate: give both the certificate and its key")
        for path in (cert, key):
            if not Path(path).is_file():
                raise CncError(f"NATS TLS client certificate: {path} does not exist")
        context.load_cert_chain(str(cert), str(key))
    return context


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
    ("grpc.max_reconnect_backoff_ms", 500),
)
"""A brain service that restarts (or whose standby takes over) is back within seconds, on the same
address: a channel tries it again at most 0.5 s apart. gRPC's defaults (1 s, then ×1.6 up to 120 s,
and the subchannel with its backoff is shared by every channel of the process to that address)
left a caller waiting 1.6-4 s after the service was serving again. (`grpc.min_reconnect_backoff_ms`
stays at its default: gRPC gives each connection attempt that long, 20 s, to complete.)"""


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
