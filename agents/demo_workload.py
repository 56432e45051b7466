"""A small real workload for sites that run processes (Slurm): what the tests and `cncbrain up
--slurm-site` run when a workload names no command of its own.

    python -m agents.demo_workload serve            # a replica: HTTP on $CNC_PORT (0: any free port),
                                                    # GET /health answers 200 with who it is
    python -m agents.demo_workload train --seconds 30   # a shard: progress 0 → 1 over the time,
                                                    # written to $CNC_PROGRESS_FILE, then exit 0
    python -m agents.demo_workload                  # train when $CNC_SHARD_INDEX is set (a shard),
                                                    # else serve; train for $CNC_DEMO_TRAIN_S (300)

Both print one line when they start (`serving on http://HOST:PORT`, `shard I of N …`) and read
the executor's environment (CNC_WORKLOAD_ID, CNC_UNIT_INDEX, CNC_SHARD_INDEX, CNC_WORLD_SIZE,
CNC_PEERS; docs/executors.md). SIGTERM ends them at once (Slurm's cancel).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def identity() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("CNC_") or k in ("SLURM_JOB_ID", "SLURMD_NODENAME")}


def serve(port: int) -> int:
    me = identity()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            if self.path.split("?")[0] != "/health":
                self.send_error(404)
                return
            body = json.dumps({"status": "ok", **me}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    host = socket.gethostname()
    print(f"serving on http://{host}:{server.server_address[1]} "
          f"(workload {me.get('CNC_WORKLOAD_ID', '?')}, replica {me.get('CNC_UNIT_INDEX', '?')})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


def train(seconds: float, step_s: float) -> int:
    me = identity()
    shard, world = me.get("CNC_SHARD_INDEX", "0"), me.get("CNC_WORLD_SIZE", "1")
    out = Path(me["CNC_PROGRESS_FILE"]) if me.get("CNC_PROGRESS_FILE") else None
    print(f"shard {shard} of {world} (workload {me.get('CNC_WORKLOAD_ID', '?')}, peers {me.get('CNC_PEERS', '')})",
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.monotonic()
    while True:
        progress = min(1.0, (time.monotonic() - start) / seconds) if seconds > 0 else 1.0
        if out is not None:
            tmp = out.with_suffix(".tmp")
            tmp.write_text(f"{progress:.4f}\n")
            tmp.replace(out)
        print(f"progress {progress:.3f}", flush=True)
        if progress >= 1.0:
            return 0
        time.sleep(step_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agents.demo_workload", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what")
    s = sub.add_parser("serve", help="an inference replica: HTTP with /health")
    s.add_argument("--port", type=int, default=int(os.environ.get("CNC_PORT", "0")))
    t = sub.add_parser("train", help="a training shard: progress over --seconds")
    t.add_argument("--seconds", type=float, default=60.0)
    t.add_argument("--step-s", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.what is None:  # the role the executor gave: a shard trains, a replica serves
        if "CNC_SHARD_INDEX" in os.environ:
            return train(float(os.environ.get("CNC_DEMO_TRAIN_S", "300")), 1.0)
        return serve(int(os.environ.get("CNC_PORT", "0")))
    if args.what == "serve":
        return serve(args.port)
    return train(args.seconds, args.step_s)


if __name__ == "__main__":
    sys.exit(main())
