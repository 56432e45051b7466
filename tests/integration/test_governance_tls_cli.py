"""TLS (plain and mutual) on the governance server with certificates from `cncbrain certs`, and the
operator's CLI path: create a tenant with quota and policy, issue its token, verify the ledger."""

import asyncio
import subprocess

import grpc
import pytest

from cnc.governance.v1 import governance_pb2 as gpb
from cnc.governance.v1 import governance_pb2_grpc
from cncbrain.auth import token_interceptors
from cncbrain.certs import channel_credentials, make_local_pki
from services.governance.server import GovernanceServer
from services.governance.settings import Settings

pytestmark = pytest.mark.integration


async def test_tls_and_mutual_tls(nats_server, tmp_path):
    pki = make_local_pki(tmp_path / "tls")
    server = await GovernanceServer(Settings(
        nats_url=nats_server.url, grpc_port=0, bootstrap_token_file=tmp_path / "op.token",
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)).start()
    token = (tmp_path / "op.token").read_text().strip()
    target = f"localhost:{server.port}"
    try:
        creds = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
        async with grpc.aio.secure_channel(target, creds, interceptors=token_interceptors(token)) as ch:
            who = await governance_pb2_grpc.GovernanceServiceStub(ch).WhoAmI(gpb.WhoAmIRequest(), timeout=5)
            assert who.role == gpb.ROLE_OPERATOR
        # Without a client certificate the handshake is refused; plaintext is refused too.
        for ch in (grpc.aio.secure_channel(target, channel_credentials(pki.ca), interceptors=token_interceptors(token)),
                   grpc.aio.insecure_channel(target, interceptors=token_interceptors(token))):
            async with ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await governance_pb2_grpc.GovernanceServiceStub(ch).WhoAmI(gpb.WhoAmIRequest(), timeout=3)
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


class Cli:
    """`cncbrain` as a user runs it, in-process (one import) and in a thread, since the server under
    test shares this event loop; returns (exit code, stdout, stderr)."""

    def __init__(self, capsys):
        self.capsys = capsys

    async def __call__(self, *args, env=None):
        from cncbrain.cli import main

        code = await asyncio.to_thread(main, list(args))
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)


async def test_operator_cli_creates_tenants_and_verifies_the_ledger(nats_server, tmp_path, capsys, monkeypatch):
    server = await GovernanceServer(Settings(nats_url=nats_server.url, grpc_port=0,
                                             bootstrap_token_file=tmp_path / "operator.token")).start()
    monkeypatch.setenv("CNC_STATE_DIR", str(tmp_path))  # where `cncbrain up` leaves the operator token
    monkeypatch.setenv("CNC_GOVERNANCE_ADDR", f"127.0.0.1:{server.port}")
    monkeypatch.delenv("CNC_TOKEN", raising=False)
    monkeypatch.delenv("CNC_TOKEN_FILE", raising=False)
    env = None
    cli = Cli(capsys)
    try:
        res = await cli("tenants", "create", "eu-bank", "--gpus", "H100=8", "--max-cost", "50", "--regions", "eu", env=env)
        assert res.returncode == 0, res.stderr
        res = await cli("tokens", "issue", "--tenant", "eu-bank", "--out", str(tmp_path / "bank.token"), env=env)
        assert res.returncode == 0, res.stderr
        listed = await cli("tenants", "--json", env=env)
        assert '"eu-bank"' in listed.stdout and '"H100"' in listed.stdout and '"eu"' in listed.stdout
        # The tenant's own token may not create tenants: PERMISSION_DENIED, exit 2, a clear message.
        denied = await cli("tenants", "create", "evil", "--token", (tmp_path / "bank.token").read_text().strip(), env=env)
        assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
        who = await cli("tokens", "whoami", "--token", (tmp_path / "bank.token").read_text().strip(), env=env)
        assert "tenant of tenant eu-bank" in who.stdout or "of tenant eu-bank" in who.stdout
        bad = await cli("tenants", "--token", "tok_0000000000000000.wrongwrongwrongwrongwrong", env=env)
        assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr
        ok = await cli("ledger", "verify", env=env)
        assert ok.returncode == 0 and "ledger OK: 3 entries" in ok.stdout, ok.stdout + ok.stderr
        head = (await cli("ledger", "head", env=env)).stdout.strip()
        assert (await cli("ledger", "verify", "--expect", head, env=env)).returncode == 0
        longer = f"{int(head.split(':')[0]) + 2}:{head.split(':')[1]}"
        tampered = await cli("ledger", "verify", "--expect", longer, env=env)
        assert tampered.returncode == 1 and "removed" in tampered.stdout
    finally:
        await server.stop()
