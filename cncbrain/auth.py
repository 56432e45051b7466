"""The one gRPC auth layer of the brain: a server interceptor every service installs, the client
side that sends the token, and the feed that keeps each process's token directory current.

Server: `AuthInterceptor(directory, operator_only=...)` reads ``authorization: Bearer <token>``
from the call metadata. No token, a malformed, unknown or revoked one -> UNAUTHENTICATED; a tenant
calling an operator-only method -> PERMISSION_DENIED. Health and reflection stay open so probes
and grpcurl work without credentials. The caller is then available to the servicer as
`current_principal()`; a servicer that touches a workload calls
`require_tenant_access(current_principal(), owner)`, whose `PermissionDenied` the error interceptor
(`cncbrain.grpcserver`) answers as PERMISSION_DENIED.

Tokens are checked against an in-process `TokenDirectory` (cncbrain.identity), fed from the KV
bucket governance writes (`TokenFeed`), so a check costs a dict lookup and one sha256. A record
counts only with governance's signature (`cncbrain.signing`), checked once when it arrives; a
revoked token stays revoked.

Client: `token_interceptors(token)` adds the header to every call of a channel; `load_token()`
finds the token the way the CLI does (argument, `CNC_TOKEN`, `CNC_TOKEN_FILE`, the bring-up's file).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from cncbrain import metrics
from cncbrain.errors import CncError
from cncbrain.identity import (
    AuthError,
    PermissionDenied,
    Principal,
    Role,
    TokenDirectory,
    TokenRecord,
    Unauthenticated,
    parse_bearer,
    require_operator,
    require_tenant_access,
)
from cncbrain.kvfeed import KvFollower
from cncbrain.signing import SignatureError, Verifier, verifier_from_env

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
TOKENS_BUCKET = "cnc-tokens"
"""KV bucket of token records (id -> TokenRecord JSON, hashes only); written by governance."""
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")
OPERATOR_TOKEN_FILE = "operator.token"
"""The file of a state folder `cncbrain up` writes the operator token to (and clients read it from)."""

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("cnc_principal", default=None)

__all__ = [
    "AuthInterceptor", "PermissionDenied", "Principal", "TokenDirectory", "TokenFeed", "Unauthenticated",
    "current_principal", "load_token", "require_operator", "require_tenant_access",
    "token_interceptors", "with_principal",
]


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served (set by `AuthInterceptor`)."""
    p = _principal.get()
    if p is None:
        raise Unauthenticated("no authenticated caller in this context")
    return p


def optional_principal() -> Principal | None:
    return _principal.get()


@contextlib.contextmanager
def with_principal(principal: Principal | None):
    """Run code as `principal` (servers with auth disabled, tests, in-process calls)."""
    token = _principal.set(principal)
    try:
        yield
    finally:
        _principal.reset(token)


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


def _wrap(handler: Any, principal: Principal | None, refusal: AuthError | None, method: str = ""):
    """Same handler kind, run with the principal set, or refusing with the auth status (logged, in
    the call's trace)."""
    code = refusal.status if refusal is not None else None
    message = str(refusal) if refusal is not None else ""

    async def refuse(context: grpc.aio.ServicerContext) -> None:
        assert code is not None
        log.warning("refused %s: %s %s (peer %s)", method, code.name, message, context.peer())
        await context.abort(code, message)
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if code is not None:
                await refuse(context)
            token = _principal.set(principal)
            try:
                return await inner_uu(request, context)
            finally:
                _principal.reset(token)

        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if code is not None:
                await refuse(context)
            _principal.set(principal)  # the generator runs in its own context copy
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            if code is not None:
                await refuse(context)
            _principal.set(principal)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                    handler.response_serializer)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if code is not None:
            await refuse(context)
        _principal.set(principal)
        async for item in inner_ss(requests, context):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                 handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token authentication and role check for every RPC of a server.

    directory: the token records to check against (kept current by a `TokenFeed`).
    operator_only: full method names (``/cnc.governance.v1.GovernanceService/CreateTenant``) that
    need the operator role; every other method needs any valid token.
    enabled: False lets every call through as an operator (a brain started with auth off).
    """

    def __init__(self, directory: TokenDirectory, operator_only: Iterable[str] = (), *, enabled: bool = True) -> None:
        self.directory = directory
        self.operator_only = frozenset(operator_only)
        self.enabled = enabled
        self.counters = {"allowed": 0, "unauthenticated": 0, "permission_denied": 0}
        self._anonymous_operator = Principal(token_id="auth-disabled", role=Role.OPERATOR, tenant_id=None)

    def authenticate(self, method: str, authorization: str | None) -> Principal:
        """The check itself, without gRPC (benchmarked and unit-tested on its own)."""
        principal = self.directory.verify(parse_bearer(authorization))
        if method in self.operator_only:
            require_operator(principal)
        return principal

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method.startswith(PUBLIC_PREFIXES):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if not self.enabled:
            return _wrap(handler, self._anonymous_operator, None)
        try:
            principal = self.authenticate(method, _metadata_value(details, METADATA_KEY))
        except AuthError as exc:
            reason = "permission_denied" if isinstance(exc, PermissionDenied) else "unauthenticated"
            self.counters[reason] += 1
            metrics.AUTH_DENIALS.labels(method.lstrip("/").split("/")[0], reason).inc()
            return _wrap(handler, None, exc, method)
        self.counters["allowed"] += 1
        return _wrap(handler, principal, None)


# ---- keeping the directory current from governance's KV bucket -----------------------------------


class TokenFeed:
    """Follows the token bucket into a `TokenDirectory`: initial load, then every put and delete.

    `kv` is a nats-py `KeyValue` (e.g. `await bus.kv(TOKENS_BUCKET)`); this module stays free of a
    direct NATS import so that it can be used by any process that has a bus.
    """

    def __init__(self, kv: Any, directory: TokenDirectory | None = None, verifier: Verifier | None = None) -> None:
        self.kv = kv
        self.directory = directory if directory is not None else TokenDirectory()
        self.verifier = verifier
        """Governance's public key(s): a record it did not sign is never honoured (None: no check,
        a brain without NATS credentials)."""
        self.refused = 0
        self._follower = KvFollower(kv, self._apply, "token-feed")

    async def start(self) -> TokenFeed:
        await self._follower.start()
        return self

    def _apply(self, entry: Any) -> None:
        op = getattr(entry, "operation", None)
        if (op is not None and str(op).upper().endswith(("DEL", "PURGE"))) or not entry.value:
            self.directory.remove(entry.key)
            return
        try:
            data = self.verifier.unseal(entry.value) if self.verifier else json.loads(entry.value)
            record = TokenRecord.from_dict(data)
            if record.token_id != entry.key:
                raise SignatureError(f"record of {record.token_id} stored under {entry.key}")
        except SignatureError as exc:
            self.refused += 1
            log.error("token feed: refusing record %s, not vouched for by governance: %s", entry.key, exc)
            return
        except (ValueError, KeyError, TypeError) as exc:
            log.error("token feed: ignoring malformed record %s: %s", entry.key, exc)
            return
        self.directory.put(record)

    async def stop(self) -> None:
        await self._follower.stop()


# ---- client side ---------------------------------------------------------------------------------


def load_token(explicit: str | None = None, *, required: bool = True, state_dir: Path | None = None) -> str | None:
    """The token a client sends: `explicit`, else `$CNC_TOKEN`, else the file named by
    `$CNC_TOKEN_FILE`, else the bring-up's operator token in `state_dir` (default `$CNC_STATE_DIR`,
    else .state)."""
    if explicit:
        return explicit.strip()
    env = os.environ.get("CNC_TOKEN")
    if env:
        return env.strip()
    candidates = []
    if os.environ.get("CNC_TOKEN_FILE"):
        candidates.append(Path(os.environ["CNC_TOKEN_FILE"]))
    candidates.append(Path(state_dir or os.environ.get("CNC_STATE_DIR") or ".state") / OPERATOR_TOKEN_FILE)
    for path in candidates:
        if path.is_file():
            return path.read_text().strip()
    if required:
        raise CncError(
            "no API token: pass --token, set CNC_TOKEN or CNC_TOKEN_FILE, or run `cncbrain up`, which "
            f"writes the operator token to {candidates[-1]} (--state-dir names another state folder)"
        )
    return None


class _BearerToken:
    def __init__(self, token: str) -> None:
        self.pair = (METADATA_KEY, f"Bearer {token}")

    async def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self.pair]
        new = grpc.aio.ClientCallDetails(details.method, details.timeout, grpc.aio.Metadata(*metadata),
                                         details.credentials, details.wait_for_ready)
        return await continuation(new, request)


class _BearerUU(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _BearerUS(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


def token_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send `token` as a bearer token on every call (none if no token)."""
    if not token:
        return []
    return [_BearerUU(token), _BearerUS(token)]


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, f"Bearer {token}"),)


async def server_auth(bus: Any, operator_only: Iterable[str] = (), *, enabled: bool = True) -> tuple[AuthInterceptor, TokenFeed | None]:
    """The interceptor a service installs, with its directory following governance's token bucket.

        interceptor, feed = await server_auth(bus, enabled=settings.auth_enabled)
        await start_grpc_server(settings, register, names, interceptors=[interceptor])
        ...
        if feed: await feed.stop()
    """
    directory = TokenDirectory()
    feed = None
    if enabled:
        feed = await TokenFeed(await bus.kv(TOKENS_BUCKET), directory, verifier_from_env()).start()
    return AuthInterceptor(directory, operator_only, enabled=enabled), feed


def bearer_of(context: Any) -> str | None:
    """The raw token a gRPC caller presented (to forward it to another service on its behalf)."""
    for k, v in context.invocation_metadata() or ():
        if k == METADATA_KEY:
            value = v if isinstance(v, str) else v.decode()
            scheme, _, token = value.partition(" ")
            return token if scheme.lower() == "bearer" and token else None
    return None


async def subscribe_durable(bus: Any, spec: Any, handler: Any, consumer: str, timeout_s: float = 10.0) -> Any:
    """`bus.subscribe(..., durable=True)`, riding out the moment after a restart when the server
    still sees the previous process's subscription on the durable consumer ("already bound")."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await bus.subscribe(spec, handler, consumer=consumer, durable=True)
        except Exception as exc:
            if "already bound" not in str(exc) or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
