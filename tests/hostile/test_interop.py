"""An independent HTTP/2 gRPC stack (grpclib, pure Python) against the server: Generate, Session and
health interoperate, errors come back as the same status codes."""

import asyncio

import pytest
from grpc_health.v1 import health_pb2
from grpclib import GRPCError
from grpclib.client import Channel, StreamStreamMethod, UnaryStreamMethod, UnaryUnaryMethod
from grpclib.const import Status

from nextword.v1 import nextword_pb2 as pb

PATH = "/nextword.v1.Inference/"


def test_grpclib_generate_session_and_health(tiny_server):
    async def run():
        channel = Channel("127.0.0.1", tiny_server.port)
        try:
            health = UnaryUnaryMethod(
                channel,
                "/grpc.health.v1.Health/Check",
                health_pb2.HealthCheckRequest,
                health_pb2.HealthCheckResponse,
            )
            status = (await health(health_pb2.HealthCheckRequest(service="nextword.v1.Inference"))).status
            generate = UnaryStreamMethod(channel, PATH + "Generate", pb.GenerateRequest, pb.GenerateEvent)
            request = pb.GenerateRequest(
                prompt=pb.Prompt(text="Hi"), max_new_tokens=5, sampling=pb.SamplingParams(ignore_eos=True)
            )
            events = await generate(request)
            with pytest.raises(GRPCError) as bad:
                await generate(pb.GenerateRequest(prompt=pb.Prompt(text="Hi"), max_new_tokens=0))
            session = StreamStreamMethod(channel, PATH + "Session", pb.GenerateRequest, pb.SessionEvent)
            async with session.open() as stream:
                await stream.send_message(request)
                await stream.send_message(
                    pb.GenerateRequest(request_id="b", prompt=pb.Prompt(text="Hello"), max_new_tokens=3)
                )
                await stream.end()
                session_events = [e async for e in stream]
            return status, events, bad.value, session_events
        finally:
            channel.close()

    status, events, bad, session_events = asyncio.run(run())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert len(events) == 5 and events[-1].finish.reason == pb.FINISH_REASON_LENGTH
    assert bad.status == Status.INVALID_ARGUMENT and "max_new_tokens" in bad.message
    finals = [e.generate for e in session_events if e.generate.HasField("finish")]
    assert finals[-1].request_id == "b"
