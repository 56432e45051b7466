"""`cncbrain usage`: GPU-hours and cost per tenant and per workload over a time range."""

from __future__ import annotations

import argparse
import re
import time

from rich.table import Table

from cncbrain.commands._govcli import add_common, call, dump
from cncbrain.commands._output import show, wants_json
from cncbrain.errors import UsageError

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def when(text: str | None, default: float) -> float:
    """`2h` (ago), an epoch second, or an ISO time."""
    if not text:
        return default
    m = _AGO.match(text)
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"time {text!r}: give e.g. 2h, 30m, an epoch second or an ISO time") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("usage", help="GPU-hours and cost per tenant and workload")
    p.add_argument("--tenant", default="")
    p.add_argument("--workload", default="")
    p.add_argument("--since", default=None, help="start: 24h (ago), epoch seconds or ISO time (default: all)")
    p.add_argument("--until", default=None, help="end (default: now)")
    p.add_argument("--by-gpu-type", action="store_true")
    add_common(p, "governance")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc.governance.v1 import governance_pb2 as gpb

    req = gpb.GetUsageRequest(tenant_id=args.tenant, workload_id=args.workload, by_gpu_type=args.by_gpu_type)
    t0, t1 = when(args.since, 0.0), when(args.until, time.time())
    if t1 < t0:
        raise UsageError("--until is before --since")
    req.start.FromNanoseconds(int(t0 * 1e9))
    req.end.FromNanoseconds(int(t1 * 1e9))
    resp = call(args, "governance", lambda s: s.GetUsage(req, timeout=30))
    if wants_json(args):
        dump(resp)
        return 0
    table = Table(title="usage")
    for col in ("tenant", "workload", "GPU type", "GPU-hours", "cost (USD)"):
        table.add_column(col)
    for line in [*resp.tenants, *resp.workloads]:
        table.add_row(line.tenant_id, line.workload_id or "(all)", line.gpu_type or "-", f"{line.gpu_hours:.3f}",
                      f"{line.cost_usd:.2f}")
    show(table)
    return 0
