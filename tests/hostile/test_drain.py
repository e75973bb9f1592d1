"""Item 10 of issue 10: a drain does what the proto says. While it lasts the port stays open, health says
NOT_SERVING and new requests get UNAVAILABLE; in-flight streams past the grace period end with a final
FINISH_REASON_CANCELLED event (not a transport error); the engine is left with nothing."""

import asyncio
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import running_server

from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc


def test_drain_shows_not_serving_then_cancels_streams_with_a_final_event(tiny_folder):
    with running_server(model=tiny_folder, weights="f32", kv_cache_tokens=4096) as srv:
        target = f"127.0.0.1:{srv.port}"
        # Hold the engine thread (a call that waits), so the streams are still in flight when the grace ends
        # whatever the machine's speed: the test is ordered by events, not by how fast tokens come.
        release = threading.Event()
        srv.runner.call(lambda: release.wait(60))
        with grpc.insecure_channel(target) as ch:
            stub = nextword_pb2_grpc.InferenceStub(ch)
            request = pb.GenerateRequest(prompt=pb.Prompt(text="Hi"), max_new_tokens=100)
            streams = [stub.Generate(request) for _ in range(3)]
            session = stub.Session(iter([request]))
            while srv.runner.engine.live_sequences < 4:  # all submitted, none can finish
                threading.Event().wait(0.01)
            loop = srv.loading.get_loop()
            stopping = asyncio.run_coroutine_threadsafe(srv.stop(grace_s=0.5), loop)

            # during the grace: a new connection sees NOT_SERVING, and new requests are UNAVAILABLE
            with grpc.insecure_channel(target) as fresh:
                health = health_pb2_grpc.HealthStub(fresh)
                while (
                    health.Check(health_pb2.HealthCheckRequest()).status
                    != health_pb2.HealthCheckResponse.NOT_SERVING
                ):
                    pass
                try:
                    nextword_pb2_grpc.InferenceStub(fresh).Complete(request)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                assert code == grpc.StatusCode.UNAVAILABLE
            assert not stopping.done()
            # the grace ends (the drain cancels every live sequence), then the engine goes on
            while not srv.runner.engine._cancel_all:
                threading.Event().wait(0.01)
            release.set()
            finals = [list(s)[-1] for s in streams]
            session_events = list(session)
        stopping.result(30)
    assert [f.finish.reason for f in finals] == [pb.FINISH_REASON_CANCELLED] * 3
    assert session_events[-1].generate.finish.reason == pb.FINISH_REASON_CANCELLED
    assert srv.runner.engine.live_sequences == 0
