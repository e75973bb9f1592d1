"""The first thing every Inference request meets: bytes -> message, and bounds on what a client may send.

A server interceptor swaps each method's deserializer for one that never raises: malformed bytes (a
truncated varint, bad UTF-8 in a string) and fields over their size bound become a RequestError, which the
handler wrapper answers with INVALID_ARGUMENT (one log line, no traceback) and a Session answers in-band.

Bounds: every string and repeated field a client fills is bounded. Most are bounded twice already, by the
message size (max_request_bytes) and by the engine's checks on what it is given (prompt tokens against the
context, stop strings, top_n...). FIELD_LIMITS names the ones that the engine never sees as a whole and that
would otherwise be copied, logged or tokenized as they come: ids echoed in every event, chat roles, counts.
"""

from __future__ import annotations

import inspect
import logging

import grpc
from google.protobuf.message import DecodeError

from nextword.server.service import SERVICE_NAME, RequestError, invalid

log = logging.getLogger("nextword.requests")

# proto field full name -> the most characters (strings) or entries (repeated fields, maps) it may hold
FIELD_LIMITS = {
    "nextword.v1.GenerateRequest.request_id": 128,
    "nextword.v1.Chat.messages": 256,
    "nextword.v1.ChatMessage.role": 32,
    "nextword.v1.SamplingParams.stop_token_ids": 64,
    "nextword.v1.SamplingParams.logit_bias": 1024,
    "nextword.v1.EmbeddingTerm.text": 256,  # only its first token is used
}
MAX_METADATA_BYTES = 16 << 10  # all request headers together (grpc.max_metadata_size)


def check_sizes(message, limits: dict[str, int] = FIELD_LIMITS, path: str = "") -> None:
    """Raise INVALID_ARGUMENT naming the first field of `message` (recursively) over its bound."""
    for fd, value in message.ListFields():
        name = path + fd.name
        limit = limits.get(fd.full_name)
        repeated = fd.is_repeated
        if limit is not None and len(value) > limit:  # limits name only strings and repeated fields
            unit = "entries" if repeated else "characters"
            raise invalid(name, f"{name} has {len(value)} {unit}; at most {limit} are accepted")
        if fd.type != fd.TYPE_MESSAGE or (fd.message_type.GetOptions().map_entry):
            continue
        if repeated:
            for i, item in enumerate(value):
                check_sizes(item, limits, f"{name}[{i}].")
        else:
            check_sizes(value, limits, name + ".")


class RequestGuard(grpc.aio.ServerInterceptor):
    """Malformed or oversized requests of the Inference service -> INVALID_ARGUMENT, before any handler."""

    def __init__(self, service):
        self.service = service  # the InferenceService: it answers (and counts) rejected requests

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        decode = _safe_decoder(method, handler.request_deserializer)
        if handler.request_streaming:  # Session: each request is checked, errors answered in-band
            return grpc.stream_stream_rpc_method_handler(
                handler.stream_stream, decode, handler.response_serializer
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._guard(handler.unary_stream), decode, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            self._guard(handler.unary_unary), decode, handler.response_serializer
        )

    def _guard(self, behavior):
        abort = self.service._abort
        if inspect.isasyncgenfunction(behavior):

            async def guarded_stream(request, context):
                if isinstance(request, RequestError):
                    await abort(context, request)
                async for response in behavior(request, context):
                    yield response

            return guarded_stream

        async def guarded(request, context):
            if isinstance(request, RequestError):
                await abort(context, request)
            return await behavior(request, context)

        return guarded


def _safe_decoder(method: str, decode):
    def safe_decode(data: bytes):
        try:
            message = decode(data)
        except DecodeError as e:  # the client's bytes, not our bug: one line, no traceback
            log.warning("%s: malformed request (%d bytes): %s", method, len(data), e)
            return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {method} request: {e}")
        try:
            check_sizes(message)
        except RequestError as e:
            return e
        return message

    return safe_decode
