"""Tokens and roles: only hashes stored, constant-time check, revocation, tenant isolation."""

import json

import pytest

from cncbrain.identity import (
    PermissionDenied,
    Role,
    TokenDirectory,
    TokenRecord,
    Unauthenticated,
    hash_secret,
    mint_token,
    parse_bearer,
    require_operator,
    require_tenant_access,
    validate_tenant_id,
)


def test_minted_token_verifies_and_record_holds_only_a_hash():
    token, rec = mint_token(Role.TENANT, "acme")
    token_id, secret = token.split(".", 1)
    assert rec.token_id == token_id
    assert secret not in rec.to_json().decode()
    assert rec.secret_sha256 == hash_secret(secret)
    d = TokenDirectory()
    d.put(TokenRecord.from_dict(json.loads(rec.to_json())))  # as a reader of the tokens' bucket does
    p = d.verify(token)
    assert (p.role, p.tenant_id, p.token_id) == (Role.TENANT, "acme", token_id)


@pytest.mark.parametrize("bad", ["", "nonsense", "tok_0000000000000000.short", "Bearer x"])
def test_malformed_tokens_are_unauthenticated(bad):
    with pytest.raises(Unauthenticated):
        TokenDirectory().verify(bad)


def test_wrong_secret_unknown_id_and_revoked_are_unauthenticated():
    token, rec = mint_token(Role.OPERATOR, None)
    other, _ = mint_token(Role.OPERATOR, None)
    d = TokenDirectory()
    d.put(rec)
    token_id = token.split(".")[0]
    with pytest.raises(Unauthenticated):
        d.verify(token_id + "." + other.split(".")[1])
    with pytest.raises(Unauthenticated):
        d.verify(other)
    d.put(TokenRecord(rec.token_id, rec.secret_sha256, rec.role, None, rec.created_at, revoked_at=1.0))
    with pytest.raises(Unauthenticated, match="revoked"):
        d.verify(token)


def test_bearer_parsing():
    assert parse_bearer("Bearer abc") == "abc"
    assert parse_bearer("bearer abc") == "abc"
    for bad in (None, "", "Basic abc", "Bearer"):
        with pytest.raises(Unauthenticated):
            parse_bearer(bad)


def test_tenant_isolation_and_operator_reach():
    _, acme = mint_token(Role.TENANT, "acme")
    _, op = mint_token(Role.OPERATOR, None)
    require_tenant_access(acme.principal(), "acme")
    require_tenant_access(op.principal(), "globex")
    with pytest.raises(PermissionDenied):
        require_tenant_access(acme.principal(), "globex")
    with pytest.raises(PermissionDenied):
        require_operator(acme.principal())
    require_operator(op.principal())


def test_role_and_tenant_must_agree():
    with pytest.raises(ValueError):
        mint_token(Role.TENANT, None)
    with pytest.raises(ValueError):
        mint_token(Role.OPERATOR, "acme")


@pytest.mark.parametrize("bad", ["A", "ab", "Acme", "acme-", "1acme", "a" * 41, "ac me"])
def test_tenant_id_validation(bad):
    with pytest.raises(ValueError):
        validate_tenant_id(bad)
