"""A nats-server with the brain's authentication and permissions (as `cncbrain up` runs it), and raw
nats-py clients for the attacker: anonymous, with an unknown key, or holding one identity's seed.

`Attacker` records the server's permission refusals (they arrive asynchronously, as `-ERR`), so a
test can wait for the refusal of exactly what it tried and then check that nothing got through.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import grpc
import nats
import pytest

from cncbrain.bus import Bus
from cncbrain.bus.credentials import AUTH_FILE, NATS_DIR, client_options, ensure_identities
from cncbrain.bus.permissions import ADMIN, SERVICES, site_identity
from cncbrain.natsserver import NatsServer
from cncbrain.signing import ensure_signing_key

from support.nats_probe import round_trip

SITES = ("a", "b")


@dataclass
class Attacker:
    nc: nats.aio.client.Client
    errors: list[str] = field(default_factory=list)

    async def refused(self, what: str, timeout: float = 3.0) -> bool:
        """Wait until the server refused something naming `what` (a subject); True if it did."""
        await round_trip(self.nc)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if any("permissions violation" in e.lower() and what.lower() in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


@pytest.fixture
def secrets(tmp_path):
    folder = tmp_path / "secrets"
    ensure_identities(folder, [ADMIN, *SERVICES, *(site_identity(s) for s in SITES), "agents-h"],
                      {"agents-h": ["a"]})  # an agent host speaking for site a only
    return folder


@pytest.fixture
async def secure_nats(tmp_path, secrets):
    """A nats-server admitting only the brain's identities, streams and buckets provisioned by admin."""
    from services.governance.ledger_store import LedgerStore

    server = NatsServer(tmp_path / "jetstream", log_file=tmp_path / "nats.log",
                        auth=secrets / NATS_DIR / AUTH_FILE).start()
    admin = await Bus.connect(server.url, "admin", identity=ADMIN, secrets_dir=secrets)
    await LedgerStore(admin).ensure()
    for bucket in ("cnc-tokens", "cnc-governance", "cnc-adaptation"):
        await admin.kv(bucket)
    yield server
    await admin.close()
    server.stop()


@pytest.fixture
async def attacker(secure_nats, secrets):
    """`await attacker(identity)`: a raw client as that identity (None: anonymous)."""
    made: list[Attacker] = []

    async def connect(identity: str | None = None, **options) -> Attacker:
        box = Attacker(None)  # type: ignore[arg-type]

        async def on_error(exc: Exception) -> None:
            box.errors.append(str(exc))

        auth = client_options(identity, secrets) if identity else {}
        box.nc = await nats.connect(secure_nats.url, error_cb=on_error, allow_reconnect=False,
                                    connect_timeout=2, **{**auth, **options})
        made.append(box)
        return box

    yield connect
    for a in made:
        await a.close()


@pytest.fixture
async def admin(secure_nats, secrets):
    bus = await Bus.connect(secure_nats.url, "test-admin", identity=ADMIN, secrets_dir=secrets, ensure=False)
    yield bus
    await bus.close()


@pytest.fixture
async def brain(secure_nats, secrets, tmp_path, monkeypatch):
    from services.adaptation.server import AdaptationServer
    from services.adaptation.settings import Settings as AdaptationSettings
    from services.governance.server import GovernanceServer
    from services.governance.settings import Settings as GovernanceSettings
    from services.perception.server import PerceptionServer
    from services.perception.settings import Settings as PerceptionSettings
    from services.scheduler.server import SchedulerServer
    from services.scheduler.settings import Settings as SchedulerSettings

    ensure_signing_key(secrets)
    monkeypatch.setenv("CNC_SECRETS_DIR", str(secrets))
    url = secure_nats.url
    governance = await GovernanceServer(GovernanceSettings(
        nats_url=url, grpc_port=0, bootstrap_token_file=tmp_path / "operator.token")).start()
    operator = (tmp_path / "operator.token").read_text().strip()
    perception = await PerceptionServer(PerceptionSettings(nats_url=url, grpc_port=0, auth_enabled=True)).start()
    scheduler = await SchedulerServer(SchedulerSettings(
        nats_url=url, grpc_port=0, auth_enabled=True, governance_target=f"127.0.0.1:{governance.port}",
        governance_token=operator)).start()
    adaptation = await AdaptationServer(AdaptationSettings(nats_url=url, grpc_port=0, auth_enabled=True)).start()
    servers = {"governance": governance, "perception": perception, "scheduler": scheduler, "adaptation": adaptation}
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for name, s in servers.items()}
    yield servers, channels, operator
    for ch in channels.values():
        await ch.close()
    for name in ("adaptation", "scheduler", "perception", "governance"):  # a test may have restarted one
        await servers[name].stop()

