"""`cncbrain credentials`: the brain's secrets folder outside `cncbrain up` (compose, production):
one NATS identity (nkey) per service role and per site, the nats-server `authorization` block that
admits exactly those keys with their permissions, and governance's signing key. Keeps what exists
(a rerun adds new sites; restarted services keep their identities).

    cncbrain credentials --out /var/lib/cncbrain/secrets --sites chicago atlanta
    cncbrain credentials --out secrets --scenario abilene        # every site of a scenario
    # nats-server: include secrets/nats/auth.conf in its configuration
    # every brain process: CNC_SECRETS_DIR=secrets (each reads only its own nats/<identity>.nk)

With `--nats-tls NODE[=HOST,...]` (repeatable) the folder also holds the brain's CA (`tls/ca.pem`,
`tls/ca.key`) and each NATS node's certificate (`tls/nats-<node>.pem`/`.key`; SANs: the node's
name, the hosts given, loopback), kept while valid and re-issued within 30 days of expiry.

`--export WHO=DIR` (repeatable) copies what one process needs, and nothing else, into its own
folder (compose gives each container its own volume, deploy/docker-compose.yml):

    an identity (governance, scheduler, ..., agents-NAME, site-ID, admin)
        nats/<identity>.nk, governance.pub, tls/ca.pem; governance also governance/signing.key
    nats-server
        auth.conf, ca.pem and every node's nats-<node>.pem/.key (flat: nats.conf includes them)
    public
        nats/identities.json (public keys: `cncbrain sites enroll --scenario`), governance.pub, tls/ca.pem

A process's own key is written last, so a container waiting for that file finds the rest in place.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cncbrain.bus.credentials import AUTH_FILE, NATS_DIR
from cncbrain.commands._output import add_output_arg, print_json, wants_json
from cncbrain.errors import CncError
from cncbrain.signing import PUBLIC_FILE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("credentials", help="make the NATS identities and governance's signing key (compose, production)")
    p.add_argument("--out", type=Path, required=True, help="the secrets folder (created; files mode 0600)")
    p.add_argument("--sites", nargs="*", default=[], help="site ids that get a site agent identity")
    p.add_argument("--scenario", default=None, help="also every site of this scenario")
    p.add_argument("--host", default=None, metavar="agents-NAME",
                   help="also an identity for one agent process hosting all these sites (`cncbrain agent --identity`)")
    p.add_argument("--nats-tls", action="append", default=[], metavar="NODE[=HOST,...]",
                   help="also the CA and a TLS certificate for this NATS server (node name, extra DNS names or IPs; "
                        "loopback is always in); repeatable, one per node")
    p.add_argument("--export", action="append", default=[], metavar="WHO=DIR",
                   help="copy what WHO needs into DIR: an identity's key (+ public key, CA; governance: its signing "
                        "key), `nats-server` (auth.conf, CA, node certificates) or `public`; repeatable")
    p.add_argument("--owner", default=None, metavar="UID[:GID]",
                   help="with --export: the owner of the exported files (a container's user)")
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
    from cncbrain.bus.permissions import HOST_PREFIX
    from cncbrain.bus.subjects import SubjectError, check_token

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
    from cncbrain.certs import ensure_nats_certs

    nodes = parse_nodes(args.nats_tls)
    exports = parse_exports(args.export)
    owner = parse_owner(args.owner)
    known = make_secrets(args.out, sites, args.host)
    certs = ensure_nats_certs(args.out / TLS_DIR, nodes) if nodes else []
    for who, dest in exports:
        export(args.out, who, dest, owner)
    if wants_json(args):
        print_json({"folder": str(args.out), "identities": known,
                    "nats_tls": {c.node: str(c.cert) for c in certs}, "exported": {w: str(d) for w, d in exports}})
        return 0
    print(f"secrets in {args.out}: {len(known)} NATS identities ({', '.join(sorted(known))})\n"
          f"  nats-server: include {args.out / NATS_DIR / AUTH_FILE} in its configuration\n"
          f"  every brain process: CNC_SECRETS_DIR={args.out} (each reads only its nats/<identity>.nk)\n"
          f"  governance's public key: {args.out / PUBLIC_FILE}")
    for c in certs:
        print(f"  NATS node {c.node}: {c.cert} / {c.key} (clients: CNC_NATS_TLS_CA={c.ca})")
    for who, dest in exports:
        print(f"  {who}: exported to {dest}")
    return 0


TLS_DIR = "tls"
"""Sub-folder of a secrets folder with the CA and the NATS nodes' certificates."""
PUBLIC = "public"
NATS_SERVER = "nats-server"


def parse_nodes(values: list[str]) -> dict[str, list[str]]:
    """`NODE[=HOST,...]` values -> {node: [hosts]}."""
    from cncbrain.certs import check_node

    nodes: dict[str, list[str]] = {}
    for value in values:
        for item in value.split():  # `--nats-tls "nats nats-2"` from one variable also works
            node, _, hosts = item.partition("=")
            if not node:
                raise CncError(f"--nats-tls {value!r}: expected NODE[=HOST,...]")
            check_node(node)
            nodes[node] = [h for h in hosts.split(",") if h]
    return nodes


def parse_exports(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for value in values:
        who, sep, dest = value.partition("=")
        if not sep or not who or not dest:
            raise CncError(f"--export {value!r}: expected WHO=DIR (an identity, {NATS_SERVER} or {PUBLIC})")
        out.append((who, Path(dest)))
    return out


def parse_owner(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    uid, _, gid = value.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise CncError(f"--owner {value!r}: expected UID[:GID] (numbers)") from None


def export(folder: Path, who: str, dest: Path, owner: tuple[int, int] | None = None) -> list[Path]:
    """Copy what `who` needs from the secrets folder `folder` into `dest` (see the module's doc);
    the identity's own key last. Returns the files written."""
    from cncbrain.bus.credentials import IDENTITIES_FILE, load_identities, seed_file
    from cncbrain.signing import PRIVATE_FILE

    folder = Path(folder)
    tls = folder / TLS_DIR
    files: list[tuple[Path, str]] = []  # (source, path under dest)
    if who == NATS_SERVER:
        files += [(p, p.name) for p in sorted(tls.glob("nats-*.pem")) + sorted(tls.glob("nats-*.key"))]
        files += [(tls / "ca.pem", "ca.pem"), (folder / NATS_DIR / AUTH_FILE, AUTH_FILE)]
        optional = {"ca.pem"}  # a server without TLS needs only auth.conf
    elif who == PUBLIC:
        files += [(folder / NATS_DIR / IDENTITIES_FILE, f"{NATS_DIR}/{IDENTITIES_FILE}"),
                  (folder / PUBLIC_FILE, str(PUBLIC_FILE)), (tls / "ca.pem", f"{TLS_DIR}/ca.pem")]
        optional = {f"{TLS_DIR}/ca.pem"}
    else:
        if who not in load_identities(folder):
            raise CncError(f"--export {who}: no such identity in {folder} (known: "
                           f"{', '.join(sorted(load_identities(folder)))}; or {NATS_SERVER}, {PUBLIC})")
        files += [(folder / PUBLIC_FILE, str(PUBLIC_FILE)), (tls / "ca.pem", f"{TLS_DIR}/ca.pem")]
        if who == "governance":
            files.append((folder / PRIVATE_FILE, str(PRIVATE_FILE)))
        files.append((seed_file(folder, who), f"{NATS_DIR}/{who}.nk"))
        optional = {f"{TLS_DIR}/ca.pem"}
    written = []
    for source, name in files:
        if not source.is_file():
            if name in optional:
                continue
            raise CncError(f"--export {who}: {source} does not exist")
        target = Path(dest) / name
        _install(source.read_bytes(), target, owner)
        written.append(target)
    if owner is not None:
        for d in {Path(dest), *(t.parent for t in written)}:
            os.chown(d, *owner)
    Path(dest).chmod(0o700)
    return written


def _install(data: bytes, target: Path, owner: tuple[int, int] | None) -> None:
    """Write `data` to `target` (mode 0600, owned by `owner`) atomically."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, target)


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["credentials", *sys.argv[1:]]))
