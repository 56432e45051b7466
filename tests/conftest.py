"""Shared fixtures: a real nats-server (JetStream, store in a tmp dir, free port) and a connected
`Bus`. Services under test run as real gRPC servers on loopback (see tests/service/)."""

from __future__ import annotations

import pytest

from cncbrain import telemetry
from cncbrain.natsserver import NatsServer

telemetry.setup("tests")


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "jetstream", log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server):
    from cncbrain.bus import Bus

    b = await Bus.connect(nats_server.url, "test")
    yield b
    await b.close()
