"""Server interceptors: bearer-token authentication, one access-log line per RPC, and the replica's name on
every Inference response.

`AccessLog` wraps every handler (those the token check rejects included): when the call ends it writes one
line with the method, the peer, the request id, the status code, the duration and what the servicer noted
about the request (`note()`). Everything a client chose (request ids, method names) is escaped and capped,
so a request cannot write a line of its own into the log.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import logging
import time

import grpc

log = logging.getLogger("nextword.requests")

REPLICA_HEADER = "x-nextword-replica"  # initial metadata: which server replica answers (docs/deploy.md)
HEALTH_PREFIX = "/grpc.health.v1.Health/"  # open without a token: load balancers and probes have none
MAX_FIELD_CHARS = 80
MAX_LINE_CHARS = 1000

_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("nextword_request_log", default=None)


def note(**fields) -> None:
    """Add fields (request_id=..., detail=...) to the access-log line of the RPC being handled."""
    record = _current.get()
    if record is not None:
        record.update(fields)


def sanitize(value, limit: int = MAX_FIELD_CHARS) -> str:
    """Printable, one line, at most `limit` characters: control characters (newlines, ESC...) and
    backslashes are escaped the way Python writes them."""
    text = str(value)
    out = "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _handler_kind(handler: grpc.RpcMethodHandler) -> str:
    return (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )


def _rebuild(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as `handler`, running `behavior`."""
    kind = _handler_kind(handler)
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every RPC but health needs `authorization: Bearer <token>` (compared in constant time);
    anything else is answered UNAUTHENTICATED."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the token is empty")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata) -> bool:
        given = next((v for k, v in metadata or () if k == "authorization"), "")
        given = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given, self._expected)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        return _rebuild(handler, _deny_stream if handler.response_streaming else _deny)


_DENIED = "missing or wrong token: send 'authorization: Bearer <token>' (nextword --token / NEXTWORD_TOKEN)"


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # unreachable: makes this an async generator, as a streaming handler must be


class AccessLog(grpc.aio.ServerInterceptor):
    """One INFO line per RPC once it ends, with its status code (health checks at DEBUG: probes poll)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        inner = getattr(handler, _handler_kind(handler))

        # a streaming handler is an async generator, or a coroutine that writes with context.write() (the
        # health service's Watch, which client-side health checking keeps open): that kind is awaited
        if inspect.isasyncgenfunction(inner):

            async def behavior(request, context):
                record = _begin(request, context)
                try:
                    async for response in inner(request, context):
                        yield response
                    record["status"] = _code(context)
                except BaseException as e:
                    record["status"] = _failure_code(e, context)
                    raise
                finally:
                    _end(method, context, record)

        else:

            async def behavior(request, context):
                record = _begin(request, context)
                try:
                    response = await inner(request, context)
                    record["status"] = _code(context)
                    return response
                except BaseException as e:
                    record["status"] = _failure_code(e, context)
                    raise
                finally:
                    _end(method, context, record)

        return _rebuild(handler, behavior)


def _begin(request, context) -> dict:
    """A new record for this RPC. gRPC runs each RPC in a task of its own, so the context variable set here
    is this RPC's alone (no reset needed)."""
    # the peer is read now: once a cancelled call is torn down, context.peer() can crash grpcio (a segfault
    # seen with hundreds of client-cancelled streams)
    record = {
        "start": time.perf_counter(),
        "request_id": getattr(request, "request_id", ""),
        "peer": context.peer(),
    }
    _current.set(record)
    return record


def _code(context) -> str:
    code = context.code()
    return "OK" if code is None else getattr(code, "name", str(code))


def _failure_code(error: BaseException, context) -> str:
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    code = context.code()
    if code is not None and getattr(code, "name", "") != "OK":
        return code.name
    return "UNKNOWN"


def _end(method: str, context, record: dict) -> None:
    ms = (time.perf_counter() - record["start"]) * 1000
    rid = record.get("request_id") or "-"
    line = (
        f"{sanitize(method.rsplit('/', 1)[-1])} id={sanitize(rid)} status={record['status']} "
        f"{ms:.0f} ms peer={sanitize(record['peer'])}"
    )
    if record.get("detail"):
        line += ": " + sanitize(record["detail"], MAX_LINE_CHARS)
    level = logging.DEBUG if method.startswith(HEALTH_PREFIX) else logging.INFO
    log.log(level, "%s", line[:MAX_LINE_CHARS])


class ReplicaName(grpc.aio.ServerInterceptor):
    """Names this server in the initial metadata (`x-nextword-replica: NAME`) of every response of the
    Inference service, so that a client balancing over replicas can tell which one answered.

    The metadata goes out with the first response message, not before: a call refused before any response
    (UNAVAILABLE while loading or draining) has then sent nothing, and a client's retry policy may still send
    it to another replica (a retry is only possible until the response headers arrive)."""

    def __init__(self, name: str = ""):
        self.name = name  # set once the port is bound (the default name includes it)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        inner = getattr(handler, _handler_kind(handler))

        if handler.response_streaming:

            async def behavior(request, context):
                first = True
                async for response in inner(request, context):
                    if first:
                        first = False
                        await context.send_initial_metadata(((REPLICA_HEADER, self.name),))
                    yield response

        else:

            async def behavior(request, context):
                response = await inner(request, context)
                await context.send_initial_metadata(((REPLICA_HEADER, self.name),))
                return response

        return _rebuild(handler, behavior)
