"""The errors the brain raises on purpose, under one root, each with what it means to a caller.

`CncError` and its subclasses carry a message meant for the user and, as `status`, the gRPC status
a service answers with: `cncbrain.grpcserver.ErrorInterceptor` (in every service's server) turns
a `CncError` raised by a handler into that status and its message, and any other exception — a
bug — into INTERNAL, with its traceback in the service's log. The CLI prints a `CncError` and
exits 1 (a `UsageError`, 2). A handler raises; it does not pick status codes itself.

| class | status | for |
| --- | --- | --- |
| `CncError` | FAILED_PRECONDITION | the operation cannot be done in the current state |
| `InvalidArgument` | INVALID_ARGUMENT | a request field or an input is malformed (also a `ValueError`) |
| `UsageError` | INVALID_ARGUMENT | the command line or a setting is wrong (CLI exit 2) |
| `NotFound` | NOT_FOUND | what the request names does not exist |
| `AlreadyExists` | ALREADY_EXISTS | what the request creates exists already |
| `FailedPrecondition` | FAILED_PRECONDITION | the named thing is in a state that refuses it |
| `ResourceExhausted` | RESOURCE_EXHAUSTED | over a quota or a capacity |
| `Unavailable` | UNAVAILABLE | a dependency is away; nothing changed, retry |
| `Aborted` | ABORTED | a concurrent change won (compare-and-set); read again |
| `Unauthenticated` | UNAUTHENTICATED | no valid credentials (`cncbrain.identity`) |
| `PermissionDenied` | PERMISSION_DENIED | credentials valid, not for this (`cncbrain.identity`) |
| `DataLoss` | DATA_LOSS | stored state is gone or damaged |
"""

from __future__ import annotations

import grpc


class CncError(Exception):
    """A user-facing error: the CLI prints it and exits 1; a service answers `status`."""

    status: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(CncError, ValueError):
    """Malformed input; also a `ValueError`, so validators (pydantic's among them) take it as one."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class UsageError(InvalidArgument):
    """The command line (or a setting) is wrong: a bad flag value, an unknown name, a bad input file.
    The CLI prints it and exits 2, as argparse does for a malformed command line."""


class ScenarioError(UsageError):
    """A scenario file or name is wrong; the message names the file and the field."""


class NotFound(CncError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CncError):
    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CncError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(CncError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CncError):
    status = grpc.StatusCode.UNAVAILABLE


class Aborted(CncError):
    status = grpc.StatusCode.ABORTED


class DataLoss(CncError):
    status = grpc.StatusCode.DATA_LOSS
