"""Item 6 of issue 10: a long prompt pass or inspection shares the engine with the streams already decoding
(they keep receiving tokens while it runs), and a request whose client gave up stops at its next chunk."""

import threading

import grpc
import pytest
from servers import wait_idle, wait_until

from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc

pytestmark = pytest.mark.real_model
LONG_TEXT = "The history of computing is a story of abstraction layered on abstraction. " * 80


@pytest.fixture
def stub(smollm2_server):
    with grpc.insecure_channel(f"127.0.0.1:{smollm2_server.port}") as ch:
        yield nextword_pb2_grpc.InferenceStub(ch)


def tokens_during(stub, long_call) -> tuple[int, object]:
    """Tokens another stream receives while `long_call()` runs (the stream is decoding before it starts)."""
    stream = stub.Generate(
        pb.GenerateRequest(
            prompt=pb.Prompt(text="Once upon a time"),
            max_new_tokens=2000,
            sampling=pb.SamplingParams(ignore_eos=True, temperature=0.0),
        )
    )
    next(stream)  # decoding
    done, counted, result = threading.Event(), [], []

    def run():
        result.append(long_call())
        done.set()

    worker = threading.Thread(target=run)
    worker.start()
    for _ in stream:
        if done.is_set():
            break
        counted.append(1)
    stream.cancel()
    worker.join()
    return len(counted), result[0]


def test_a_long_prompt_pass_interleaves_with_decoding(stub, smollm2_server):
    prompt = pb.Prompt(text=LONG_TEXT[:1500])  # ~300 tokens: one step before (the budget was 1,024 tokens)
    n, response = tokens_during(
        stub, lambda: stub.NextTokenProbabilities(pb.NextTokenProbabilitiesRequest(prompt=prompt, top_n=3))
    )
    assert response.prompt_tokens > 250 and len(response.top) == 3
    assert n >= 2  # the other stream got tokens between the prompt's chunks (one step before: at most 1)
    assert wait_idle(smollm2_server) == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda stub: stub.Attention(pb.AttentionRequest(prompt=pb.Prompt(text=LONG_TEXT[:800]))),
        lambda stub: stub.Embed(pb.EmbedRequest(texts=[LONG_TEXT[:800], LONG_TEXT[:600]])),
    ],
    ids=["attention", "embed"],
)
def test_inspections_interleave_with_decoding(stub, smollm2_server, call):
    """One unit of call work between two steps (an untimed engine), so how many tokens the stream gets
    depends on the chunking alone, not on how fast a layer runs on this machine."""
    engine = smollm2_server.runner.engine
    max_step_s, engine.max_step_s = engine.max_step_s, None
    try:
        n, response = tokens_during(stub, lambda: call(stub))
    finally:
        engine.max_step_s = max_step_s
    assert response.ByteSize() > 0
    assert n >= 4  # one layer per chunk: the stream is served between them
    assert smollm2_server.runner.pending_calls == 0


def test_a_request_past_its_deadline_stops_at_its_next_chunk(stub, smollm2_server):
    long_prompt = pb.Prompt(text=LONG_TEXT)  # ~1,300 tokens: tens of chunks
    with pytest.raises(grpc.RpcError) as e:
        stub.NextTokenProbabilities(pb.NextTokenProbabilitiesRequest(prompt=long_prompt), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as e:
        stub.Attention(pb.AttentionRequest(prompt=pb.Prompt(text=LONG_TEXT[:2000])), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(smollm2_server) == 0  # dropped at its next step
    # the cancelled inspection's remaining layers are skipped: no call is left to run
    wait_until(lambda: smollm2_server.runner.pending_calls == 0, "the cancelled calls leave the engine")
