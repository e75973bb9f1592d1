"""Item 8 of issue 10: a stream whose client does not read stops being generated (paused in the engine,
its events not piling up), and goes on where it stopped once the client reads again."""

import threading

import grpc

from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc


def test_a_stream_nobody_reads_is_paused_then_resumed(tiny_server):
    engine = tiny_server.runner.engine
    # a small HTTP/2 window that does not grow (no BDP probing): unread events fill it
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}", options=options) as ch:
        request = pb.GenerateRequest(
            prompt=pb.Prompt(text="Hi"),
            max_new_tokens=120,
            top_n=20,  # ~1.5 KB per event: 120 of them do not fit in the window
            sampling=pb.SamplingParams(ignore_eos=True),
        )
        stream = nextword_pb2_grpc.InferenceStub(ch).Generate(request)
        for _ in range(3000):
            if engine.paused_sequences:
                break
            threading.Event().wait(0.01)
        assert engine.paused_sequences == 1
        paused_at = next(s.generated for s in engine._running if s.paused_at is not None)
        assert paused_at < 120
        events = list(stream)  # reading again resumes it to its end
    assert len(events) == 120 and events[-1].finish.reason == pb.FINISH_REASON_LENGTH
    assert engine.paused_sequences == 0
