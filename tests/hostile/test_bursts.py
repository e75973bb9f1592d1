"""Item 9 of issue 10: memory after bursts. Rounds of concurrent streams plus streams cancelled midway
leave anonymous memory where the first round left it (within a bound), with nothing live in the engine."""

import threading

import grpc
from servers import wait_idle

from nextword.server.memory import release_freed_memory
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc


def anonymous_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def burst(stub, streams: int, cancelled: int) -> list:
    """Returns the finish reasons of the streams read to their end."""
    request = pb.GenerateRequest(
        prompt=pb.Prompt(text="Once upon a time"),
        max_new_tokens=60,
        top_n=5,
        sampling=pb.SamplingParams(ignore_eos=True),
    )
    calls = [stub.Generate(request) for _ in range(streams + cancelled)]

    finishes = []

    def read(call, cancel):
        for i, event in enumerate(call):
            if cancel and i == 3:
                call.cancel()
                return
            if event.HasField("finish"):
                finishes.append(event.finish.reason)

    readers = [threading.Thread(target=read, args=(c, i >= streams)) for i, c in enumerate(calls)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(300)
    return finishes


def test_memory_returns_after_bursts(tiny_server):
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}") as ch:
        stub = nextword_pb2_grpc.InferenceStub(ch)
        after = []
        for _ in range(4):
            assert burst(stub, streams=40, cancelled=50) == [pb.FINISH_REASON_LENGTH] * 40
            assert wait_idle(tiny_server) == 0
            release_freed_memory()  # what the engine thread does when it goes idle
            after.append(anonymous_bytes())
    assert max(after[1:]) - after[0] < 64 << 20, [a >> 20 for a in after]
