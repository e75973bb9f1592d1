"""Property-based: any request message a client can build (and any bytes) gets OK, INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, CANCELLED or DEADLINE_EXCEEDED, never UNKNOWN or INTERNAL; the server stays SERVING and
returns to 0 live sequences. Messages are drawn from the proto descriptors, so every field of every request
message (and every new one) is covered."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import wait_idle

from nextword.v1 import nextword_pb2 as pb

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
SERVICE = pb.DESCRIPTOR.services_by_name["Inference"]
F = pb.SamplingParams.DESCRIPTOR.fields[0]  # for the type constants
SCALARS = {
    F.TYPE_STRING: st.text(max_size=40) | st.text(min_size=200, max_size=400),
    F.TYPE_BYTES: st.binary(max_size=40),
    F.TYPE_BOOL: st.booleans(),
    F.TYPE_FLOAT: st.floats(width=32),
    F.TYPE_DOUBLE: st.floats(),
    F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1) | st.integers(-3, 400),
    F.TYPE_UINT32: st.integers(0, 2**32 - 1) | st.integers(0, 300),
    F.TYPE_UINT64: st.integers(0, 2**64 - 1),
    F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
}


def messages(descriptor, depth=0):
    """A strategy for messages of `descriptor`: each field set or not, oneofs one member at most."""
    cls = getattr(pb, descriptor.name)
    fields = {}
    for fd in descriptor.fields:
        if fd.type == fd.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                key, value = fd.message_type.fields
                item = st.tuples(SCALARS[key.type], SCALARS[value.type])
                fields[fd.name] = st.lists(item, max_size=4).map(dict)
                continue
            if depth > 3:
                continue
            one = messages(fd.message_type, depth + 1)
        elif fd.type == fd.TYPE_ENUM:
            one = st.sampled_from([v.number for v in fd.enum_type.values])
        else:
            one = SCALARS[fd.type]
        fields[fd.name] = st.lists(one, max_size=4) if fd.is_repeated else one
    oneof_of = {fd.name: fd.containing_oneof.name for fd in descriptor.fields if fd.containing_oneof}

    @st.composite
    def build(draw):
        chosen, seen = {}, set()
        for name, strategy in fields.items():
            group = oneof_of.get(name)
            if draw(st.booleans()) and group not in seen:
                chosen[name] = draw(strategy)
                if group:
                    seen.add(group)
        message = cls()
        for name, value in chosen.items():
            if isinstance(value, dict):
                getattr(message, name).update(value)
            elif isinstance(value, list):
                getattr(message, name).extend(value)
            elif hasattr(value, "DESCRIPTOR"):
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()


def call(channel, method, request):
    path = f"/{SERVICE.full_name}/{method.name}"
    decode = getattr(pb, method.output_type.name).FromString
    if method.client_streaming:
        stream = channel.stream_stream(path, request_serializer=None, response_deserializer=decode)
        return list(stream(iter(r.SerializeToString() for r in request), timeout=30))
    data = request if isinstance(request, bytes) else request.SerializeToString()
    if method.server_streaming:
        return list(channel.unary_stream(path, response_deserializer=decode)(data, timeout=30))
    return channel.unary_unary(path, response_deserializer=decode)(data, timeout=30)


def status_of(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), e.details())
        return e.code()


PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
)


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_any_request_gets_an_allowed_status(channel, tiny_server, method):
    strategy = messages(method.input_type)
    if method.client_streaming:
        strategy = st.lists(strategy, max_size=5)

    @PROPERTY
    @given(strategy)
    def check(request):
        assert status_of(lambda: call(channel, method, request)) in ALLOWED

    check()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert wait_idle(tiny_server) == 0


@PROPERTY
@given(st.sampled_from(list(SERVICE.methods)), st.binary(max_size=200))
def test_any_bytes_get_an_allowed_status(channel, tiny_server, method, raw):
    if method.client_streaming:
        return
    assert status_of(lambda: call(channel, method, raw)) in ALLOWED
