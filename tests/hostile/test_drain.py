"""Item 10 of issue 10: a drain does what the proto says. While it lasts the port stays open, health says
NOT_SERVING and new requests get UNAVAILABLE; in-flight streams past the grace period end with a final
FINISH_REASON_CANCELLED event (not a transport error); the engine is left with nothing. A second signal
does not wait for the drain."""

import asyncio
import os
import re
import signal
import subprocess
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import running_server, serve_argv

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


def test_a_second_sigint_during_a_drain_exits_at_once(tiny_folder):
    """A real `nextword serve`: the first SIGINT starts a drain that waits for an in-flight stream (nobody
    reads it, so it is paused, and the grace is long); a second SIGINT ends the process at once with status 1
    instead of the drain's 0."""
    cmd = serve_argv(
        tiny_folder, "--port", "0", "--metrics-port", "-1", "--grace", "600", "--kv-cache-tokens", "1024"
    )
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for line in proc.stdout:
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                port = m.group(1)
            if "ready in" in line:
                break
        # as in test_slow_readers: a window too small for the events, so the unread stream pauses
        options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
            request = pb.GenerateRequest(
                prompt=pb.Prompt(text="Hi"),
                max_new_tokens=120,
                top_n=20,
                sampling=pb.SamplingParams(ignore_eos=True),
            )
            stream = nextword_pb2_grpc.InferenceStub(ch).Generate(request)
            next(stream)  # in flight before the drain begins
            proc.send_signal(signal.SIGINT)
            for line in proc.stdout:
                if "shutting down" in line:
                    break
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 1
        assert "second signal, exiting now" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
