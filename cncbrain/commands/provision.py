"""`cncbrain provision`: create (or update) every stream and KV bucket of the brain on a NATS
server, as the `admin` identity, before the services start — each service may create only its own
(`cncbrain.bus.permissions`), and some wait for another's at start (governance reads the
scheduler's workload stream), so a fresh server is provisioned first. `cncbrain up` does this
itself; the compose stacks run it as the one-shot `provision` container.

    CNC_SECRETS_DIR=secrets CNC_NATS_TLS_CA=secrets/tls/ca.pem cncbrain provision --nats-url nats://nats:4222
"""

from __future__ import annotations

import argparse

from cncbrain import aio
from cncbrain.commands._live import add_target_args, target


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("provision", help="create every stream and KV bucket of the brain on NATS (as admin)")
    p.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="how long to wait for NATS to answer (default 60 s)")
    add_target_args(p, "nats")
    p.set_defaults(func=run)


async def provision(bus) -> list[str]:
    """Create or update, through `bus` (the admin identity, or a server without auth), every stream
    and bucket; returns their names."""
    from cncbrain.bus import subjects
    from cncbrain.bus.permissions import BUCKET_OWNERS
    from services.governance.ledger_store import LedgerStore

    await bus.ensure_streams()
    await LedgerStore(bus).ensure()
    for bucket in BUCKET_OWNERS:
        await bus.kv(bucket)
    return [s.name for s in subjects.STREAMS] + [f"KV_{b}" for b in BUCKET_OWNERS]


def run(args: argparse.Namespace) -> int:
    from cncbrain.commands._live import admin_bus

    async def go() -> list[str]:
        bus = await admin_bus(target(args, "nats"), "provision", timeout_s=args.wait, ensure=False)
        try:
            return await provision(bus)
        finally:
            await bus.close()

    made = aio.run(go())
    print(f"provisioned {len(made)} streams and buckets (each created or brought to its configuration)")
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["provision", *sys.argv[1:]]))
