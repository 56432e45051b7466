"""One mapping of errors to gRPC statuses for every service (`cncbrain.grpcserver.ErrorInterceptor`):
a `CncError` raised in a handler is answered with its class's status and message, a bug (any other
exception) with INTERNAL and its traceback in the service's log — never UNAVAILABLE or a status
that says nothing changed. Served by the real server every service uses, on a free port."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from cncbrain import errors
from cncbrain.grpcserver import start_grpc_server
from cncbrain.identity import PermissionDenied, Unauthenticated
from cncbrain.settings import ServiceSettings

SERVICE = "cnc.test.v1.Errors"


CODEC = {"request_deserializer": Empty.FromString, "response_serializer": Empty.SerializeToString}


def _raise(exc: BaseException):
    async def unary(request: Empty, context: grpc.aio.ServicerContext) -> Empty:
        raise exc

    return grpc.unary_unary_rpc_method_handler(unary, **CODEC)


def _stream_then(exc: BaseException):
    async def stream(request: Empty, context: grpc.aio.ServicerContext):
        yield Empty()
        raise exc

    return grpc.unary_stream_rpc_method_handler(stream, **CODEC)


async def _explicit_abort(request: Empty, context: grpc.aio.ServicerContext) -> Empty:
    await context.abort(grpc.StatusCode.OUT_OF_RANGE, "chosen by the handler")
    return Empty()


CASES = {
    "NotFound": (errors.NotFound("no workload 'w1'"), grpc.StatusCode.NOT_FOUND),
    "AlreadyExists": (errors.AlreadyExists("tenant 'lab' already exists"), grpc.StatusCode.ALREADY_EXISTS),
    "InvalidArgument": (errors.InvalidArgument("gpus: at least 1"), grpc.StatusCode.INVALID_ARGUMENT),
    "FailedPrecondition": (errors.FailedPrecondition("workload is already CANCELLED"),
                           grpc.StatusCode.FAILED_PRECONDITION),
    "ResourceExhausted": (errors.ResourceExhausted("over quota"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "Unavailable": (errors.Unavailable("ledger unavailable"), grpc.StatusCode.UNAVAILABLE),
    "DataLoss": (errors.DataLoss("ledger removed"), grpc.StatusCode.DATA_LOSS),
    "PermissionDenied": (PermissionDenied("another tenant's workload"), grpc.StatusCode.PERMISSION_DENIED),
    "Unauthenticated": (Unauthenticated("revoked"), grpc.StatusCode.UNAUTHENTICATED),
    "KeyError": (KeyError("w1"), grpc.StatusCode.INTERNAL),
    "RuntimeError": (RuntimeError("an invariant broke"), grpc.StatusCode.INTERNAL),
}


@pytest.fixture
async def server():
    handlers = {name: _raise(exc) for name, (exc, _) in CASES.items()}
    handlers["Abort"] = grpc.unary_unary_rpc_method_handler(_explicit_abort, **CODEC)
    handlers["StreamBug"] = _stream_then(IndexError("list index"))
    handlers["StreamRefused"] = _stream_then(errors.ResourceExhausted("behind"))
    started = await start_grpc_server(
        ServiceSettings(grpc_port=0),
        lambda s: s.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)]), [])
    yield started
    await started.stop(0)


async def _call(port: int, method: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/{method}", request_serializer=Empty.SerializeToString,
                                 response_deserializer=Empty.FromString)(Empty(), timeout=5)
    return info.value


@pytest.mark.parametrize("name", [n for n, (_, code) in CASES.items() if code != grpc.StatusCode.INTERNAL])
async def test_a_domain_error_is_answered_with_its_status_and_message(server, name, caplog):
    exc, code = CASES[name]
    err = await _call(server.port, name)
    assert err.code() == code
    assert err.details() == str(exc)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a refusal is not a failure of the service"


@pytest.mark.parametrize("name", ["KeyError", "RuntimeError"])
async def test_a_bug_is_internal_with_its_traceback_logged(server, name, caplog):
    caplog.set_level(logging.ERROR, logger="cncbrain.grpcserver")
    err = await _call(server.port, name)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert name in err.details() and f"/{SERVICE}/{name}" in err.details()
    logged = [r for r in caplog.records if r.name == "cncbrain.grpcserver" and r.exc_info]
    assert logged, "the traceback of the bug is in the service's log"
    assert logged[0].exc_info[0].__name__ == name
    assert "Traceback" in caplog.text and "test_errors.py" in caplog.text  # where it was raised


async def test_a_handler_that_aborts_keeps_its_own_status(server):
    err = await _call(server.port, "Abort")
    assert (err.code(), err.details()) == (grpc.StatusCode.OUT_OF_RANGE, "chosen by the handler")


async def test_a_streaming_handler_ends_with_the_status_of_its_error(server, caplog):
    caplog.set_level(logging.ERROR, logger="cncbrain.grpcserver")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        for method, code in (("StreamRefused", grpc.StatusCode.RESOURCE_EXHAUSTED),
                             ("StreamBug", grpc.StatusCode.INTERNAL)):
            call = ch.unary_stream(f"/{SERVICE}/{method}", request_serializer=Empty.SerializeToString,
                                   response_deserializer=Empty.FromString)(Empty(), timeout=5)
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for item in call:
                    got.append(item)
            assert got == [Empty()] and info.value.code() == code
    assert any(r.exc_info and r.exc_info[0] is IndexError for r in caplog.records)
