"""Typed exceptions for failed calls: the gRPC status code, the server's message, and the rich details
(google.rpc.BadRequest names the offending field, google.rpc.RetryInfo says when to retry)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class NextwordError(Exception):
    """A call that failed with a gRPC status.

    Attributes:
        code: the grpc.StatusCode.
        code_name: its name, e.g. "INVALID_ARGUMENT".
        message: the server's details string.
        field: the request field at fault (from a BadRequest detail), e.g. "sampling.temperature"; or None.
        retry_after_s: how long to wait before retrying (from a RetryInfo detail), or None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.field, self.retry_after_s = code, message, field, retry_after_s

    @property
    def code_name(self) -> str:
        return self.code.name


class InvalidArgument(NextwordError):
    """A bad request field; `.field` names it."""


class ResourceExhausted(NextwordError):
    """The queue is full or a message is too large; `.retry_after_s` may say when to retry."""


class Unavailable(NextwordError):
    """The server is not reachable, still loading the model, or draining."""


class Cancelled(NextwordError):
    """The call was cancelled."""


class DeadlineExceeded(NextwordError):
    """The call's timeout passed."""


class Internal(NextwordError):
    """The server failed."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}


def from_rpc_error(e: grpc.RpcError) -> NextwordError:
    """The typed error for a failed sync or asyncio call (`raise from_rpc_error(e) from None`)."""
    code = (e.code() if hasattr(e, "code") else None) or grpc.StatusCode.UNKNOWN
    message = (e.details() if hasattr(e, "details") else str(e)) or ""
    field, retry_after_s = None, None
    try:
        status = rpc_status.from_call(e) if hasattr(e, "trailing_metadata") else None
    except ValueError:  # the details disagree with the status line: keep the status line
        status = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations and field is None:
                field = bad.field_violations[0].field
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after_s = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    cls = _BY_CODE.get(code, NextwordError)
    return cls(code, message, field=field, retry_after_s=retry_after_s)
