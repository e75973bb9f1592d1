"""Item 12 of issue 10: on a first start the port is bound before the default model is fetched and imported,
so clients see NOT_SERVING and UNAVAILABLE (with a retry delay) instead of "connection refused"."""

import asyncio
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextword.server import serve as serve_module
from nextword.server.serve import NextwordServer, ServerConfig
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc


def test_port_answers_while_the_default_model_is_fetched(tiny_folder, monkeypatch):
    fetching, fetched = threading.Event(), threading.Event()

    def slow_fetch():  # stands in for the download and import of the default model
        fetching.set()
        fetched.wait(60)
        return tiny_folder

    monkeypatch.setattr(serve_module, "_default_model", slow_fetch)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(120)

    srv = NextwordServer(ServerConfig(model=None, weights="f32", port=0, metrics_port=None, grace_s=1))
    try:
        port = run(srv.start())
        assert fetching.wait(60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert (
                health.Check(health_pb2.HealthCheckRequest()).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            try:
                nextword_pb2_grpc.InferenceStub(ch).Complete(pb.GenerateRequest(prompt=pb.Prompt(text="Hi")))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.details()
            else:
                raise AssertionError("served before the model was there")
            fetched.set()
            run(srv.wait_ready())
            assert (
                health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            )
    finally:
        fetched.set()
        run(srv.stop(1))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
