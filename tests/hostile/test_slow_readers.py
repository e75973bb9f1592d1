"""Item 8 of issue 10: a stream whose client does not read stops being generated (paused in the engine,
its events not piling up), goes on where it stopped once the client reads again, and is cancelled once it
has been paused longer than the engine's bound (max_paused_s)."""

import threading

import grpc
from servers import wait_idle, wait_until

from nextword.server.engine import Engine
from nextword.server.sampling import SamplingParams
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


def test_a_paused_sequence_is_cancelled_after_its_bound(tiny_folder):
    """The bound on pausing, on an injected clock: the paused sequence is not advanced while paused, is kept
    until max_paused_s has passed since its pause, then ends CANCELLED with its cache freed."""
    now = [0.0]
    engine = Engine.load(tiny_folder, kv_cache_tokens=256, max_paused_s=5.0, clock=lambda: now[0])
    out = []
    params = SamplingParams(temperature=0.0, max_new_tokens=50, ignore_eos=True)
    seq = engine.submit(engine.tokenizer.encode("Hi"), params, out.append)
    engine.step()
    engine.step()
    engine.pause(seq)  # at t=0
    generated = len(out)
    for t in (1.0, 4.9):
        now[0] = t
        engine.step()
        assert len(out) == generated and engine.live_sequences == 1  # kept, not advanced
    now[0] = 5.0
    engine.step()
    assert out[-1].finish.reason == "cancelled" and out[-1].token is None
    assert engine.live_sequences == 0 and engine.blocks.free_blocks == engine.blocks.num_blocks


def test_a_stream_nobody_reads_ends_cancelled_after_the_bound(tiny_server):
    """End to end: a stream left unread is paused, then cancelled once max_paused_s (made small here) has
    passed; its client, reading at last, gets the buffered events and a final FINISH_REASON_CANCELLED."""
    engine = tiny_server.runner.engine
    bound, engine.max_paused_s = engine.max_paused_s, 0.2
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}", options=options) as ch:
            request = pb.GenerateRequest(
                prompt=pb.Prompt(text="Hi"),
                max_new_tokens=120,
                top_n=20,  # as above: the unread events fill the window before the end
                sampling=pb.SamplingParams(ignore_eos=True),
            )
            stream = nextword_pb2_grpc.InferenceStub(ch).Generate(request)
            finished = engine.finishes["cancelled"]
            wait_until(lambda: engine.finishes["cancelled"] > finished, "the unread stream is cancelled")
            assert wait_idle(tiny_server) == 0
            events = list(stream)
    finally:
        engine.max_paused_s = bound
    assert events[-1].finish.reason == pb.FINISH_REASON_CANCELLED
    assert len(events) - 1 == events[-1].finish.usage.generated_tokens < 120
