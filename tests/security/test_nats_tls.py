"""TLS on NATS client connections: a server with a certificate from the brain's CA requires TLS of
every client; the brain's processes trust only that CA and check the server's name; a plain
client, an anonymous one, a client trusting other CAs, a certificate naming another host and a
server that does not do TLS at all are each refused with a clear reason."""

from __future__ import annotations

import pytest

from cncbrain.bus import Bus
from cncbrain.bus.credentials import AUTH_FILE, NATS_DIR
from cncbrain.bus.permissions import ADMIN
from cncbrain.certs import ensure_nats_certs, make_local_pki
from cncbrain.errors import CncError
from cncbrain.natsserver import NatsServer, NatsTls

from support.nats_probe import plain_exchange


def server_tls(folder, node="local", **kwargs) -> NatsTls:
    cert = ensure_nats_certs(folder, {node: []}, **kwargs)[0]
    return NatsTls(cert.cert, cert.key, cert.ca)


@pytest.fixture
def tls_nats(tmp_path, secrets):
    tls = server_tls(secrets / "tls")
    server = NatsServer(tmp_path / "js", log_file=tmp_path / "nats.log", auth=secrets / NATS_DIR / AUTH_FILE,
                        tls=tls).start()
    yield server, tls
    server.stop()


async def test_the_brain_connects_over_tls_and_a_plain_client_is_refused(tls_nats, secrets):
    server, tls = tls_nats
    bus = await Bus.connect(server.url, "admin", identity=ADMIN, secrets_dir=secrets, tls_ca=tls.ca, ensure=False)
    try:
        sub = await bus.nc.subscribe("tls.check")
        await bus.nc.publish("tls.check", b"over tls")
        assert (await sub.next_msg(timeout=2)).data == b"over tls"
        assert bus.nc._transport._io_writer.get_extra_info("ssl_object") is not None  # really encrypted
    finally:
        await bus.close()

    info, answer = plain_exchange("127.0.0.1", server.port)
    assert info["tls_required"] is True
    assert b"PONG" not in answer  # never served in the clear


async def test_without_credentials_or_with_another_ca_or_host_the_connection_is_refused(tls_nats, secrets, tmp_path):
    server, tls = tls_nats
    with pytest.raises(CncError, match="refused the connection without credentials"):  # anonymous, over TLS
        await Bus.connect(server.url, "anon", tls_ca=tls.ca, ensure=False, timeout_s=5)
    with pytest.raises(CncError, match="system's CAs"):  # no CA given: the system's do not know the brain's
        await Bus.connect(server.url, "no-ca", identity=ADMIN, secrets_dir=secrets, ensure=False, timeout_s=5)
    other = make_local_pki(tmp_path / "other-ca")
    with pytest.raises(CncError, match="does not verify against the CA"):
        await Bus.connect(server.url, "other-ca", identity=ADMIN, secrets_dir=secrets, tls_ca=other.ca,
                          ensure=False, timeout_s=5)


async def test_a_certificate_for_another_host_is_refused(tmp_path, secrets):
    tls = server_tls(tmp_path / "tls", node="nats-elsewhere", loopback=False)  # the CA's, but not 127.0.0.1's
    with NatsServer(tmp_path / "js", auth=secrets / NATS_DIR / AUTH_FILE, tls=tls) as server, \
            pytest.raises(CncError, match="127.0.0.1"):
        await Bus.connect(server.url, "admin", identity=ADMIN, secrets_dir=secrets, tls_ca=tls.ca,
                          ensure=False, timeout_s=5)


async def test_a_process_with_a_ca_refuses_a_server_without_tls(tmp_path, secrets):
    tls = server_tls(tmp_path / "tls")
    with NatsServer(tmp_path / "js", auth=secrets / NATS_DIR / AUTH_FILE) as plain, \
            pytest.raises(CncError, match="does not use TLS"):
        await Bus.connect(plain.url, "admin", identity=ADMIN, secrets_dir=secrets, tls_ca=tls.ca,
                          ensure=False, timeout_s=5)


def test_node_certificates_are_kept_while_valid_and_reissued_when_asked_for_more(tmp_path):
    from cryptography import x509

    from cncbrain.certs import cert_hosts

    first = ensure_nats_certs(tmp_path, {"nats": [], "nats-2": ["10.0.0.2"]})
    pem = first[0].cert.read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert set(cert_hosts(cert)) == {"nats", "localhost", "127.0.0.1", "::1"}
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in usages} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}  # server and client (routes)
    assert oct(first[0].key.stat().st_mode & 0o777) == "0o600" and oct((tmp_path / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert ensure_nats_certs(tmp_path, {"nats": []})[0].cert.read_bytes() == pem  # kept
    assert ensure_nats_certs(tmp_path, {"nats": []}, renew_within_days=400)[0].cert.read_bytes() != pem  # expiring
    pem = first[0].cert.read_bytes()
    again = ensure_nats_certs(tmp_path, {"nats": ["nats.example.org"]})[0]  # a new name: a new certificate
    assert "nats.example.org" in cert_hosts(x509.load_pem_x509_certificate(again.cert.read_bytes()))
    with pytest.raises(CncError, match="node name"):
        ensure_nats_certs(tmp_path, {"../etc": []})


async def test_a_key_added_to_a_running_server_is_admitted_after_its_reload(tmp_path, secrets):
    """`reload_if_changed` (what `cncbrain up` calls as it supervises): a key added to auth.conf is
    admitted without a restart, and the connections already open stay up."""
    import asyncio

    from cncbrain.bus.credentials import add_identity, new_seed, public_key, write_private
    from cncbrain.bus.permissions import site_identity

    tls = server_tls(secrets / "tls")
    with NatsServer(tmp_path / "js", auth=secrets / NATS_DIR / AUTH_FILE, tls=tls) as server:  # port 0: any
        admin = await Bus.connect(server.url, "admin", identity=ADMIN, secrets_dir=secrets, tls_ca=tls.ca, ensure=False)
        site_dir = tmp_path / "new-site"
        seed = new_seed()
        write_private(site_dir / NATS_DIR / "site-new.nk", seed + b"\n")
        with pytest.raises(CncError, match="refused"):
            await Bus.connect(server.url, "new", identity=site_identity("new"), secrets_dir=site_dir, tls_ca=tls.ca,
                              ensure=False, timeout_s=5)
        assert not server.reload_if_changed()  # nothing changed yet
        add_identity(secrets, site_identity("new"), public_key(seed))
        assert server.reload_if_changed() and not server.reload_if_changed()
        for _ in range(50):  # the server takes the signal asynchronously
            try:
                bus = await Bus.connect(server.url, "new", identity=site_identity("new"), secrets_dir=site_dir,
                                        tls_ca=tls.ca, ensure=False, timeout_s=5)
                break
            except CncError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the added key was never admitted")
        await bus.nc.publish("cnc.site.new.heartbeat", b"")  # its own subject: allowed
        await bus.nc.flush()
        assert admin.nc.is_connected and bus.nc.is_connected
        await bus.close()
        await admin.close()
