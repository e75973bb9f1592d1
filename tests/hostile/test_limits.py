"""Items 1, 4, 5 of issue 10: every string a client sends is bounded, malformed bytes and non-finite maths
are INVALID_ARGUMENT with the field named, and the server goes on serving."""

import asyncio
import logging

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from servers import SAFETY_S, wait_idle

from nextword.client import AsyncClient
from nextword.v1 import nextword_pb2 as pb


def field_of(error: grpc.RpcError) -> str:
    """The field path of the BadRequest detail of an INVALID_ARGUMENT."""
    status = rpc_status.from_call(error)
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    return ""


def request(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=pb.Prompt(text="Hi"), max_new_tokens=4, **fields)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: request(request_id="x" * 1_000_000), "request_id"),
        (
            lambda: pb.GenerateRequest(
                prompt=pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(role="r" * 10_000, content="Hi")]))
            ),
            "prompt.chat.messages[0].role",
        ),
        (
            lambda: pb.GenerateRequest(
                prompt=pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="a")] * 300))
            ),
            "prompt.chat.messages",
        ),
        (lambda: request(sampling=pb.SamplingParams(stop=["s" * 300])), "sampling.stop"),
        (
            lambda: request(sampling=pb.SamplingParams(stop_token_ids=list(range(65)))),
            "sampling.stop_token_ids",
        ),
        (
            lambda: request(sampling=pb.SamplingParams(logit_bias={i: 1.0 for i in range(1025)})),
            "sampling.logit_bias",
        ),
    ],
)
def test_oversized_strings_are_refused_naming_the_field(stub, make, field):
    for call in (stub.Complete, lambda r: list(stub.Generate(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(make())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_of(e.value) == field
        assert len(e.value.details()) < 300  # the message names the size, it does not echo the value


def test_session_answers_an_oversized_request_in_band_and_goes_on(stub, tiny_server):
    requests = [request(request_id="x" * 100_000), request(request_id="ok")]
    events = list(stub.Session(iter(requests)))
    assert events[0].error.code == "INVALID_ARGUMENT" and events[0].error.field == "request_id"
    assert events[-1].generate.request_id == "ok" and events[-1].generate.HasField("finish")
    assert wait_idle(tiny_server) == 0


def test_oversized_metadata_is_refused_before_any_handler(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(request(), metadata=[("x-junk", "j" * 100_000)])
    assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
    assert stub.Complete(request(), metadata=[("x-fine", "f" * 1000)]).finish.usage.generated_tokens > 0


@pytest.mark.parametrize(
    "raw",
    [
        b"\x12\x04\x0a\x02\xff\xfe",  # prompt.text holding invalid UTF-8
        b"\x20\xff\xff",  # max_new_tokens: a varint cut short
        b"\x12\x10\x0a",  # prompt: a length past the end of the message
    ],
)
def test_malformed_bytes_are_invalid_argument_with_one_log_line(channel, stub, raw, caplog):
    complete = channel.unary_unary("/nextword.v1.Inference/Complete")  # no serializer: raw bytes
    generate = channel.unary_stream("/nextword.v1.Inference/Generate")
    with caplog.at_level(logging.INFO, logger="nextword"):
        for call in (complete, lambda r: list(generate(r))):
            with pytest.raises(grpc.RpcError) as e:
                call(raw)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed" in e.value.details()
    records = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(records) == 2 and not any(r.exc_info for r in records)
    assert stub.Complete(request()).finish.usage.generated_tokens > 0  # still serving


def test_malformed_bytes_in_a_session_are_answered_in_band(channel, tiny_server):
    session = channel.stream_stream(
        "/nextword.v1.Inference/Session", response_deserializer=pb.SessionEvent.FromString
    )
    events = list(
        session(iter([b"\x12\x04\x0a\x02\xff\xfe", request(request_id="after").SerializeToString()]))
    )
    assert events[0].error.code == "INVALID_ARGUMENT" and "malformed" in events[0].error.message
    assert events[-1].generate.request_id == "after" and events[-1].generate.HasField("finish")


def test_nearest_tokens_with_huge_weights_is_invalid_argument(stub):
    terms = [pb.EmbeddingTerm(token_id=i + 10, weight=3e38) for i in range(16)]
    with pytest.raises(grpc.RpcError) as e:
        stub.NearestTokens(pb.NearestTokensRequest(terms=terms, top_n=3))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(e.value) == "terms[0].weight"
    # the largest accepted weights still give finite cosines
    terms = [pb.EmbeddingTerm(token_id=i + 10, weight=1e6 * (-1) ** i) for i in range(16)]
    response = stub.NearestTokens(pb.NearestTokensRequest(terms=terms, top_n=3))
    cosines = [t.cosine for t in [*response.terms, *response.nearest]]
    assert all(-1.001 <= c <= 1.001 for c in cosines)


def test_a_session_logs_one_sanitized_line_per_request(tiny_server, caplog):
    """A Session carries many requests: each gets its own access-log line, its id escaped like any other."""

    async def run():
        async with AsyncClient(f"127.0.0.1:{tiny_server.port}") as ac:
            s = ac.session()
            items = aiter(s)
            for rid in ("first\nforged", "second"):
                await s.send("Hello", request_id=rid, max_new_tokens=2, ignore_eos=True, temperature=0.0)
                while (await asyncio.wait_for(anext(items), SAFETY_S)).finish is None:
                    pass
            await s.close()

    with caplog.at_level(logging.INFO, logger="nextword.requests"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Session request ")]
    assert [line.split(":")[0] for line in lines] == [
        "Session request id=first\\nforged",
        "Session request id=second",
    ]
    assert all("2 generated tokens, finish=length" in line for line in lines)
