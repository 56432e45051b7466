"""`cncbrain credentials`: the brain's secrets folder outside `cncbrain up` (compose, production):
one NATS identity (nkey) per service role and per site, the nats-server `authorization` block that
admits exactly those keys with their permissions, and governance's signing key. Keeps what exists
(a rerun adds new sites; restarted services keep their identities).

    cncbrain credentials --out /var/lib/cncbrain/secrets --sites chicago atlanta
    cncbrain credentials --out secrets --scenario abilene        # every site of a scenario
    # nats-server: include secrets/nats/auth.conf in its configuration
    # every brain process: CNC_SECRETS_DIR=secrets (each reads only its own nats/<identity>.nk)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cncbrain.commands._output import add_output_arg, print_json, wants_json
from cncbrain.errors import CncError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("credentials", help="make the NATS identities and governance's signing key (compose, production)")
    p.add_argument("--out", type=Path, required=True, help="the secrets folder (created; files mode 0600)")
    p.add_argument("--sites", nargs="*", default=[], help="site ids that get a site agent identity")
    p.add_argument("--scenario", default=None, help="also every site of this scenario")
    p.add_argument("--host", default=None, metavar="agents-NAME",
                   help="also an identity for one agent process hosting all these sites (`cncbrain agent --identity`)")
    add_output_arg(p)
    p.set_defaults(func=run)


def make_secrets(folder: Path, sites: list[str], host: str | None = None) -> dict[str, str]:
    """Every role's and each site's NATS identity and governance's signing key in `folder`, made
    where missing (`cncbrain up` calls this too); with `host` (`agents-<name>`), also the identity
    of an agent process hosting all of `sites`. Returns identity -> public key."""
    from cncbrain.bus.credentials import ensure_identities
    from cncbrain.bus.permissions import ADMIN, SERVICES, site_identity
    from cncbrain.signing import ensure_signing_key

    known = ensure_identities(folder, [ADMIN, *SERVICES, *(site_identity(s) for s in sites), *([host] if host else [])],
                              {host: sorted(sites)} if host else None)
    ensure_signing_key(folder)
    return known


def run(args: argparse.Namespace) -> int:
    from cncbrain.bus.credentials import AUTH_FILE, NATS_DIR
    from cncbrain.bus.permissions import HOST_PREFIX
    from cncbrain.bus.subjects import SubjectError, check_token
    from cncbrain.signing import PUBLIC_FILE

    sites = list(args.sites)
    if args.scenario:
        from agents.executor_emulated import site_ids_of
        from cncbrain.scenario import load_scenario

        sites += [s for s in site_ids_of(load_scenario(args.scenario)) if s not in sites]
    try:
        for s in sites:
            check_token(s, "site id")
        if args.host:
            check_token(args.host, "host")
    except SubjectError as exc:
        raise CncError(str(exc)) from None
    if args.host and not args.host.startswith(HOST_PREFIX):
        raise CncError(f"--host {args.host!r}: an agent host's identity starts with {HOST_PREFIX!r}")
    known = make_secrets(args.out, sites, args.host)
    if wants_json(args):
        print_json({"folder": str(args.out), "identities": known})
        return 0
    print(f"secrets in {args.out}: {len(known)} NATS identities ({', '.join(sorted(known))})\n"
          f"  nats-server: include {args.out / NATS_DIR / AUTH_FILE} in its configuration\n"
          f"  every brain process: CNC_SECRETS_DIR={args.out} (each reads only its nats/<identity>.nk)\n"
          f"  governance's public key: {args.out / PUBLIC_FILE}")
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["credentials", *sys.argv[1:]]))
