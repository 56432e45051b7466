"""`cncbrain certs`: make a local CA and server/client certificates for TLS between the brain's
gRPC services and their clients.

    cncbrain certs --out .state/tls
    CNC_GOVERNANCE_TLS_CERT_FILE=.state/tls/server.pem CNC_GOVERNANCE_TLS_KEY_FILE=.state/tls/server.key ...
    CNC_TLS_CA=.state/tls/ca.pem cncbrain tenants
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cncbrain.commands._output import add_output_arg, print_json, wants_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make a local CA and TLS certificates for the gRPC services")
    p.add_argument("--out", type=Path, default=Path(".state") / "tls", help="folder for the files (default .state/tls)")
    p.add_argument("--host", nargs="*", default=[], help="extra DNS names or IPs for the server certificate")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    add_output_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cncbrain.certs import make_local_pki

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
