"""NATS credentials of the brain: one nkey (Ed25519 key pair, NATS's own user authentication) per
identity of `cncbrain.bus.permissions`, kept in a secrets folder, and the nats-server configuration
that admits exactly those keys with their permissions.

A client proves it holds its seed by signing the server's nonce; the seed never crosses the wire,
so authentication holds on a plain loopback connection too. Layout of the folder (files 0600):

    nats/<identity>.nk       the seed of each identity (`SU…`), read by that process only
    nats/identities.json     identity -> public nkey (`U…`): what the server admits
    nats/auth.conf           the server's `authorization { users = [...] }`, rendered from both

`ensure_identities(folder, identities)` creates what is missing and keeps what exists, so a
restarted brain, or a second instance of a service, authenticates as before; `render_auth` is
called again after an identity is added (a site enrolled) and the server reloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import nkeys

from cncbrain.bus.permissions import grant_for
from cncbrain.errors import CncError

NATS_DIR = "nats"
IDENTITIES_FILE = "identities.json"
AUTH_FILE = "auth.conf"
HOSTS_FILE = "hosts.json"
"""Agent host identity -> the sites it speaks for."""


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 (atomically: a reader never sees half a key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def new_seed() -> bytes:
    """A fresh user nkey seed (`SU…`)."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def public_key(seed: bytes) -> str:
    return nkeys.from_seed(bytearray(seed.strip())).public_key.decode()


def seed_file(folder: Path, identity: str) -> Path:
    return Path(folder) / NATS_DIR / f"{identity}.nk"


def read_seed(folder: Path, identity: str) -> bytes:
    path = seed_file(folder, identity)
    try:
        seed = path.read_bytes().strip()
    except FileNotFoundError:
        raise CncError(f"no NATS credentials for {identity!r}: {path} does not exist "
                       "(`cncbrain up` creates them; `cncbrain credentials` for compose and production)") from None
    try:
        public_key(seed)
    except Exception:
        raise CncError(f"{path} is not a NATS user nkey seed") from None
    return seed


def client_options(identity: str, folder: Path) -> dict[str, str]:
    """nats-py `connect` options that authenticate as `identity` with its seed from `folder`."""
    from cncbrain.bus.permissions import inbox_prefix

    return {"nkeys_seed_str": read_seed(folder, identity).decode(), "inbox_prefix": inbox_prefix(identity)}


def load_identities(folder: Path) -> dict[str, str]:
    path = Path(folder) / NATS_DIR / IDENTITIES_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def load_hosts(folder: Path) -> dict[str, list[str]]:
    path = Path(folder) / NATS_DIR / HOSTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def ensure_identities(folder: Path, identities: Iterable[str], hosts: dict[str, list[str]] | None = None
                      ) -> dict[str, str]:
    """Give every identity in `identities` a seed (new ones only) and record its public key; also
    write `auth.conf`. `hosts`: agent hosts (`agents-<name>`) and the sites each speaks for (their
    identities are in `identities` too). Returns identity -> public key for every identity of the folder."""
    folder = Path(folder)
    known = load_identities(folder)
    all_hosts = {**load_hosts(folder), **(hosts or {})}
    write_private(folder / NATS_DIR / HOSTS_FILE, json.dumps(all_hosts, indent=2, sort_keys=True).encode())
    for identity in identities:
        grant_for(identity, all_hosts)  # an identity the permission table does not know is a mistake
        path = seed_file(folder, identity)
        if path.is_file():
            known[identity] = public_key(path.read_bytes())
        else:
            seed = new_seed()
            write_private(path, seed + b"\n")
            known[identity] = public_key(seed)
    write_private(folder / NATS_DIR / IDENTITIES_FILE, json.dumps(known, indent=2, sort_keys=True).encode())
    write_private(folder / NATS_DIR / AUTH_FILE, render_auth(known, all_hosts).encode())
    return known


def add_identity(folder: Path, identity: str, public: str) -> None:
    """Admit a key whose seed is kept elsewhere (a site's own host); re-renders `auth.conf`."""
    if not public.startswith("U"):
        raise CncError(f"{public!r} is not a NATS user public key (U…)")
    known = load_identities(folder)
    known[identity] = public
    write_private(Path(folder) / NATS_DIR / IDENTITIES_FILE, json.dumps(known, indent=2, sort_keys=True).encode())
    write_private(Path(folder) / NATS_DIR / AUTH_FILE, render_auth(known, load_hosts(folder)).encode())


def _quote(value: str) -> str:
    return json.dumps(value)  # NATS config strings: JSON quoting keeps `$JS…` literal


def render_auth(identities: dict[str, str], hosts: dict[str, list[str]] | None = None) -> str:
    """The nats-server `authorization` block admitting each identity's key with its permissions."""
    lines = ["# Generated by cncbrain (cncbrain.bus.credentials): one nkey per identity, least privilege.",
             "authorization {", "  users = ["]
    for identity in sorted(identities):
        perms = grant_for(identity, hosts).as_permissions()
        pub = ", ".join(_quote(s) for s in perms["publish"]["allow"])
        sub = ", ".join(_quote(s) for s in perms["subscribe"]["allow"])
        responses = ["        allow_responses: true"] if perms.get("allow_responses") else []
        lines += [f"    # {identity}",
                  f"    {{ nkey: {_quote(identities[identity])}",
                  "      permissions: {",
                  f"        publish: {{ allow: [{pub}] }}",
                  f"        subscribe: {{ allow: [{sub}] }}",
                  *responses,
                  "      }",
                  "    }"]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)
