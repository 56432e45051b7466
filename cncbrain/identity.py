"""Who is calling: roles, principals and API tokens (pure: no network; the refusals carry their gRPC
status, `cncbrain.errors`).

A token handed to a user is ``<token_id>.<secret>``. Only ``sha256(secret)`` is ever stored, next
to the token id, the tenant it belongs to and its role; checking a presented token looks the id up
and compares digests in constant time. The secret carries 256 random bits, so a fast hash is
enough: there is nothing to brute-force that a slow KDF would protect.

`TokenDirectory` is the in-memory view every gRPC server checks tokens against. Governance writes
token records to a KV bucket; each server keeps its directory in step by watching that bucket, so
a check never leaves the process (it must add well under a millisecond to a call).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

import grpc

from cncbrain.errors import CncError, InvalidArgument
from cncbrain.limits import quote

TOKEN_ID_PREFIX = "tok_"
_TOKEN_RE = re.compile(r"^(tok_[0-9a-f]{16})\.([A-Za-z0-9_-]{20,})$")
TENANT_ID_RE = re.compile(r"^[a-z][a-z0-9-]{1,38}[a-z0-9]$")


class Role(enum.StrEnum):
    """What a principal may do. An operator runs the pool; a tenant owns its own workloads."""

    TENANT = "tenant"
    OPERATOR = "operator"


class AuthError(CncError):
    """Base of the two ways a call is refused."""

    status = grpc.StatusCode.UNAUTHENTICATED


class Unauthenticated(AuthError):
    """No credential, a malformed one, an unknown one or a revoked one (gRPC UNAUTHENTICATED)."""


class PermissionDenied(AuthError):
    """A known principal asked for something its role or tenant does not allow (PERMISSION_DENIED)."""

    status = grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request."""

    token_id: str
    role: Role
    tenant_id: str | None  # None for operators

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR

    def can_access_tenant(self, tenant_id: str) -> bool:
        return self.is_operator or self.tenant_id == tenant_id


def require_tenant_access(principal: Principal, tenant_id: str) -> None:
    """Raise `PermissionDenied` unless `principal` may act on `tenant_id`'s resources.

    Services call this with the owner of the workload a request touches; a tenant touching another
    tenant's workload is refused, an operator may touch any.
    """
    if not principal.can_access_tenant(tenant_id):
        raise PermissionDenied(
            f"tenant {principal.tenant_id!r} may not act on resources of tenant {tenant_id!r}"
        )


def require_operator(principal: Principal) -> None:
    if not principal.is_operator:
        raise PermissionDenied("this call needs the operator role")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What is stored about an issued token: never the secret, only its sha256."""

    token_id: str
    secret_sha256: str
    role: Role
    tenant_id: str | None
    created_at: float
    description: str = ""
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def principal(self) -> Principal:
        return Principal(token_id=self.token_id, role=self.role, tenant_id=self.tenant_id)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["role"] = self.role.value
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict) -> TokenRecord:
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        data["role"] = Role(data["role"])
        return cls(**data)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint_token(
    role: Role, tenant_id: str | None, *, description: str = "", now: float | None = None
) -> tuple[str, TokenRecord]:
    """Create a new token; returns (the token to hand out once, the record to store)."""
    if role is Role.TENANT and not tenant_id:
        raise InvalidArgument("a tenant token needs a tenant id")
    if role is Role.OPERATOR and tenant_id:
        raise InvalidArgument("an operator token belongs to no tenant")
    token_id = TOKEN_ID_PREFIX + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = TokenRecord(
        token_id=token_id,
        secret_sha256=hash_secret(secret),
        role=role,
        tenant_id=tenant_id,
        created_at=time.time() if now is None else now,
        description=description,
    )
    return f"{token_id}.{secret}", record


def split_token(token: str) -> tuple[str, str]:
    """Return (token_id, secret) or raise `Unauthenticated` for anything that is not a token."""
    match = _TOKEN_RE.match(token.strip())
    if match is None:
        raise Unauthenticated("malformed API token")
    return match.group(1), match.group(2)


def parse_bearer(header_value: str | None) -> str:
    """Extract the token from an ``authorization: Bearer <token>`` metadata value."""
    if not header_value:
        raise Unauthenticated("missing bearer token in 'authorization' metadata")
    scheme, _, token = header_value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the 'authorization' metadata must be 'Bearer <token>'")
    return token


@dataclass
class TokenDirectory:
    """Token records by id, checked on every call; fed from governance's KV bucket."""

    records: dict[str, TokenRecord] = field(default_factory=dict)

    def put(self, record: TokenRecord) -> None:
        known = self.records.get(record.token_id)
        if known is not None and known.revoked and not record.revoked:
            return  # a revoked token stays revoked: an older record replayed cannot bring it back
        self.records[record.token_id] = record

    def remove(self, token_id: str) -> None:
        self.records.pop(token_id, None)

    def verify(self, token: str) -> Principal:
        token_id, secret = split_token(token)
        record = self.records.get(token_id)
        # The digest is compared even for unknown ids so a miss costs the same as a wrong secret.
        expected = record.secret_sha256 if record is not None else "0" * 64
        ok = hmac.compare_digest(hash_secret(secret), expected)
        if record is None or not ok:
            raise Unauthenticated("unknown or wrong API token")
        if record.revoked:
            raise Unauthenticated(f"API token {token_id} was revoked")
        return record.principal()

    def __len__(self) -> int:
        return len(self.records)


def validate_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID_RE.match(tenant_id or ""):
        raise InvalidArgument(
            f"tenant id {quote(tenant_id)} must be 3-40 characters of a-z, 0-9 and '-', "
            "starting with a letter and not ending with '-'"
        )
    return tenant_id
