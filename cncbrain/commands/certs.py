"""`cncbrain certs`: make a local CA and server/client certificates for TLS between the brain's
gRPC services and their clients; with `--nats NODE`, a NATS server's (node's) certificate from the
CA in `--out` (made when missing), for client connections and cluster routes.

    cncbrain certs --out .state/tls
    CNC_GOVERNANCE_TLS_CERT_FILE=.state/tls/server.pem CNC_GOVERNANCE_TLS_KEY_FILE=.state/tls/server.key ...
    CNC_TLS_CA=.state/tls/ca.pem cncbrain tenants

    cncbrain certs --out secrets/tls --nats nats-1=nats-1.example.org,10.0.0.11 --nats nats-2 --nats nats-3
    # nats-server: tls { cert_file: nats-nats-1.pem, key_file: nats-nats-1.key, ca_file: ca.pem }
    # the brain's processes: CNC_NATS_TLS_CA=secrets/tls/ca.pem
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cncbrain.commands._output import add_output_arg, print_json, wants_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make a local CA and TLS certificates for the gRPC services and NATS servers")
    p.add_argument("--out", type=Path, default=Path(".state") / "tls", help="folder for the files (default .state/tls)")
    p.add_argument("--host", nargs="*", default=[], help="extra DNS names or IPs for the server certificate")
    p.add_argument("--nats", action="append", default=[], metavar="NODE[=HOST,...]",
                   help="issue (or renew) this NATS server's certificate from the CA in --out instead: SANs the node's "
                        "name, the hosts given and loopback; usable for clients and routes (repeatable)")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--force", action="store_true", help="replace an existing CA (with --nats: re-issue the node "
                                                         "certificates even while valid)")
    add_output_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cncbrain.certs import ensure_nats_certs, make_local_pki

    if args.nats:
        from cncbrain.commands.credentials import parse_nodes

        certs = ensure_nats_certs(args.out, parse_nodes(args.nats), args.days, force=args.force)
        if wants_json(args):
            print_json({"ca": str(certs[0].ca), "nats": {c.node: {"cert": str(c.cert), "key": str(c.key)}
                                                         for c in certs}})
            return 0
        for c in certs:
            print(f"NATS node {c.node}: {c.cert} / {c.key}")
        print(f"nats-server: tls {{ cert_file, key_file, ca_file: {certs[0].ca} }} (routes too, with verify: true)\n"
              f"clients:     CNC_NATS_TLS_CA={certs[0].ca}")
        return 0
    pki = make_local_pki(args.out, args.host, args.days, args.force)
    if wants_json(args):
        print_json({"folder": str(pki.folder), "ca": str(pki.ca), "server_cert": str(pki.server_cert),
                    "server_key": str(pki.server_key), "client_cert": str(pki.client_cert),
                    "client_key": str(pki.client_key)})
        return 0
    print(f"local CA and certificates in {pki.folder}:\n"
          f"  CA            {pki.ca}\n"
          f"  server        {pki.server_cert} / {pki.server_key}\n"
          f"  client (mTLS) {pki.client_cert} / {pki.client_key}\n"
          f"services: CNC_<SERVICE>_TLS_CERT_FILE, CNC_<SERVICE>_TLS_KEY_FILE (+ _TLS_CLIENT_CA_FILE for mTLS)\n"
          f"clients:  CNC_TLS_CA={pki.ca} (+ CNC_TLS_CERT / CNC_TLS_KEY for mTLS)")
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["certs", *sys.argv[1:]]))
