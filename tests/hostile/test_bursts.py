"""Item 9 of issue 10: memory after bursts. Rounds of concurrent streams plus streams cancelled midway leave
nothing behind them: no sequence, request or task object, no KV block in use (counted, so a per-request
leak fails however small the model); and the server's malloc policy gives the memory of large freed buffers
back at once (glibc's default kept it resident while the engine was busy)."""

import asyncio
import gc
import subprocess
import sys
import threading

import grpc
from servers import wait_idle, wait_until

from nextword.server import service
from nextword.server.engine import Sequence
from nextword.server.sampling import Sampler
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc


def left_behind(server) -> dict[str, int]:
    """What requests can leave behind: objects of one request, tasks on the server's loop, KV blocks held."""
    gc.collect()
    objects = gc.get_objects()
    loop = server.loading.get_loop()
    tasks = asyncio.run_coroutine_threadsafe(_count_tasks(), loop).result(30)
    return {
        "sequences": sum(isinstance(o, Sequence) for o in objects),
        "generations": sum(isinstance(o, service._Generation) for o in objects),
        "tasks": tasks,
        "blocks held": server.runner.engine.blocks.used_blocks,
    }


async def _count_tasks() -> int:
    return len(asyncio.all_tasks()) - 1  # this one excluded


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


def test_bursts_leave_nothing_behind(tiny_server):
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}") as ch:
        stub = nextword_pb2_grpc.InferenceStub(ch)
        assert burst(stub, streams=4, cancelled=4) == [pb.FINISH_REASON_LENGTH] * 4  # warm
        assert wait_idle(tiny_server) == 0
        before = left_behind(tiny_server)
        for _ in range(3):
            assert burst(stub, streams=40, cancelled=50) == [pb.FINISH_REASON_LENGTH] * 40
            assert wait_idle(tiny_server) == 0
            assert left_behind(tiny_server) == before
    assert before["sequences"] == before["generations"] == before["blocks held"] == 0


def test_finished_requests_are_freed_without_the_garbage_collector(tiny_server):
    """The soak's anonymous memory rose and fell by tens of MiB: every finished generation stayed in a
    reference cycle (its sequence -> the engine's callback -> the handler's state -> the sequence) until
    Python's next full collection, hundreds of requests later, with its sampler's buffers. With the cyclic
    collector off, streams, cancelled streams, Complete and Session requests must still leave nothing."""
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}") as ch:
        stub = nextword_pb2_grpc.InferenceStub(ch)
        keystrokes = [
            pb.GenerateRequest(
                request_id=f"k{i}", prompt=pb.Prompt(text="Once upon a time"[:i]), max_new_tokens=8
            )
            for i in range(3, 17, 3)
        ]
        gc.collect()
        gc.disable()
        try:
            assert burst(stub, streams=4, cancelled=4) == [pb.FINISH_REASON_LENGTH] * 4
            stub.Complete(pb.GenerateRequest(prompt=pb.Prompt(text="Hello"), max_new_tokens=4))
            assert list(stub.Session(iter(keystrokes)))[-1].generate.HasField("finish")
            assert wait_idle(tiny_server) == 0
            wait_until(lambda: not _requests_alive(), "every finished request's objects are freed")
        finally:
            gc.enable()


def _requests_alive() -> list:
    return [o for o in gc.get_objects() if isinstance(o, (Sequence, Sampler, service._Generation))]


# One engine step's activations after another, their sizes changing with the batch (widths of SmolLM2's
# hidden state and MLP), each step leaving a smaller live allocation above them, as serving does. Prints how
# much glibc's heap grew beyond what is still live.
STEPS = """
import ctypes, sys
import numpy as np
from nextword.server import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "server":
    memory.use_server_malloc_policy()
start, kept = libc.mallinfo2().arena, []
for tokens in (300, 300, 120, 480, 300, 60, 410):
    buffers = [np.ones((tokens, width), np.float32) for width in (576, 1536, 1536)]
    kept.append(bytearray(100_000))
    del buffers
print(libc.mallinfo2().arena - start - sum(map(len, kept)))
"""


def heap_growth(policy: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, policy], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_the_server_malloc_policy_returns_freed_activations_at_once():
    """The soak's climbing anonymous memory: glibc's default policy moves large buffers into the heap
    once one has been freed, and the holes they leave stay resident while the engine is busy (no idle
    moment to trim). Under the server's policy (`nextword serve` sets it before its threads start) the
    same steps leave the heap as it was; glibc's default, the control, grows it by several MiB."""
    assert heap_growth("default") > 4 << 20
    assert heap_growth("server") < 1 << 20
