"""The thin client and the client CLI commands against a fake in-process gRPC server (no model, no numba)."""

import asyncio
import io
import json
import math
import re
import socket
import subprocess
import sys
import threading
from concurrent import futures
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from nextword.client import (
    AsyncClient,
    Client,
    Completion,
    DeadlineExceeded,
    Distribution,
    Finish,
    GenerateEvent,
    Internal,
    InvalidArgument,
    ModelInfo,
    NextwordError,
    ResourceExhausted,
    SessionError,
    SessionReconnected,
    SpecialToken,
    Token,
    Tokenized,
    Unavailable,
    Usage,
)
from nextword.client.cli import main
from nextword.client.client import MAX_RECONNECTS, AsyncSession, is_loopback_target
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc

REPLY = ["Hello", " world", "!"]
VOCAB_PROBS = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.0078125], np.float32)
SAFETY_S = 60  # how long a wait for an event may take before the test fails: a hang guard, not a measure


# ---- the fake server ----


def rich_status(code: int, message: str, *details) -> grpc.Status:
    packed = []
    for detail in details:
        packed.append(any_pb2.Any())
        packed[-1].Pack(detail)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


def token_pb(i: int, text: str, top_n: int) -> pb.Token:
    top = [
        pb.TokenProb(token_id=200 + j, text=f"alt{j}", prob=0.5**j / 2, logprob=math.log(0.5**j / 2))
        for j in range(top_n)
    ]
    return pb.Token(
        id=100 + i, text=text, prob=0.5, logprob=math.log(0.5), top=top, index=i, elapsed_ms=1.5 + i
    )


FINISH = pb.Finish(
    reason=pb.FINISH_REASON_STOP,
    stop="\n",
    usage=pb.Usage(prompt_tokens=4, generated_tokens=3),
    timings=pb.Timings(queue_ms=0.5, prefill_ms=10.0, ttft_ms=12.0, mean_itl_ms=20.0, total_ms=52.0),
    seed=42,
)


def prompt_text(prompt: pb.Prompt) -> str:
    """The text, or the last chat message's."""
    return prompt.chat.messages[-1].content if prompt.WhichOneof("input") == "chat" else prompt.text


class FakeInference(nextword_pb2_grpc.InferenceServicer):
    """Canned answers; a few prompt texts trigger errors or a slow stream."""

    def __init__(self):
        self.requests = []
        self.ended = threading.Event()  # a slow stream's RPC terminated
        self.slow_sent = 0
        self.drained = False

    def _fail_on(self, text: str, context) -> None:
        if text == "bad-field":
            violation = error_details_pb2.BadRequest.FieldViolation(
                field="sampling.temperature", description="temperature must be in [0, 100]"
            )
            context.abort_with_status(
                rich_status(
                    code_pb2.INVALID_ARGUMENT,
                    "temperature must be in [0, 100]",
                    error_details_pb2.BadRequest(field_violations=[violation]),
                )
            )
        if text == "busy":
            retry = error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)
            )
            context.abort_with_status(rich_status(code_pb2.RESOURCE_EXHAUSTED, "the queue is full", retry))
        if text == "loading":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        if text == "boom":
            context.abort(grpc.StatusCode.INTERNAL, "engine failure")
        if text == "denied":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    def _events(self, request):
        request_id = request.request_id or "fake-1"
        for i, text in enumerate(REPLY):
            event = pb.GenerateEvent(request_id=request_id, token=token_pb(i, text, request.top_n), text=text)
            if i == len(REPLY) - 1:
                event.finish.CopyFrom(FINISH)
            yield event

    def Generate(self, request, context):
        self.requests.append(request)
        text = prompt_text(request.prompt)
        self._fail_on(text, context)
        if text == "slow":  # one event, then nothing more until the RPC ends (client cancel or deadline)
            context.add_callback(self.ended.set)
            self.slow_sent += 1
            yield pb.GenerateEvent(request_id="slow", token=token_pb(0, "x", 0), text="x")
            self.ended.wait(SAFETY_S)
            return
        if text == "fail-midway":
            yield from list(self._events(request))[:2]
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if text == "cancelled":
            yield pb.GenerateEvent(request_id="c", token=token_pb(0, "Hi", 0), text="Hi")
            yield pb.GenerateEvent(
                request_id="c", finish=pb.Finish(reason=pb.FINISH_REASON_CANCELLED, seed=1), text=""
            )
            return
        yield from self._events(request)

    def Complete(self, request, context):
        self.requests.append(request)
        self._fail_on(prompt_text(request.prompt), context)
        events = list(self._events(request))
        return pb.CompleteResponse(
            request_id=events[0].request_id,
            text="".join(e.text for e in events),
            tokens=[e.token for e in events],
            finish=events[-1].finish,
        )

    def NextTokenProbabilities(self, request, context):
        self.requests.append(request)
        self._fail_on(prompt_text(request.prompt), context)
        logprobs = np.log(VOCAB_PROBS)
        top = [
            pb.TokenProb(token_id=i, text=f"t{i}", prob=VOCAB_PROBS[i], logprob=logprobs[i])
            for i in range(min(request.top_n, len(VOCAB_PROBS)))
        ]
        return pb.NextTokenProbabilitiesResponse(
            top=top,
            logprobs=logprobs.astype("<f4").tobytes() if request.full_vocabulary else b"",
            prompt_tokens=3,
            vocab_size=len(VOCAB_PROBS),
        )

    def Tokenize(self, request, context):
        self.requests.append(request)
        if request.WhichOneof("input") == "chat":
            tokens = ["<|im_start|>"] + [m.content for m in request.chat.messages] + ["<|im_end|>"]
        else:
            self._fail_on(request.text, context)
            tokens = re.findall(r" ?\S+", request.text)
        return pb.TokenizeResponse(ids=[504 + i for i in range(len(tokens))], tokens=tokens)

    def Detokenize(self, request, context):
        self.requests.append(request)
        ids = [i for i in request.ids if not (request.skip_special_tokens and i < 3)]
        return pb.DetokenizeResponse(text="".join(f"<{i}>" for i in ids))

    def Session(self, request_iterator, context):
        """Echo each request's events in turn; "bad-field" is answered in-band, "typing" is superseded at
        once, "abort" fails the whole stream, "drain" ends it OK unanswered the first time (as a draining
        replica drops a request it has not started)."""
        for request in request_iterator:
            self.requests.append(request)
            text = prompt_text(request.prompt)
            if text == "drain" and not self.drained:
                self.drained = True
                return
            if text == "bad-field":
                error = pb.SessionError(
                    request_id=request.request_id,
                    code="INVALID_ARGUMENT",
                    message="temperature must be in [0, 100]",
                    field="sampling.temperature",
                )
                yield pb.SessionEvent(error=error)
            elif text == "typing":
                finish = pb.Finish(reason=pb.FINISH_REASON_SUPERSEDED, usage=pb.Usage(prompt_tokens=1))
                yield pb.SessionEvent(generate=pb.GenerateEvent(request_id=request.request_id, finish=finish))
            elif text == "abort":
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining")
            else:
                for event in self._events(request):
                    yield pb.SessionEvent(generate=event)

    def ModelInfo(self, request, context):
        self.requests.append(request)
        return pb.ModelInfoResponse(
            model_id="Fake-1M",
            architecture="llama",
            vocab_size=8,
            context_length=2048,
            eos_token_ids=[2],
            special_tokens=[
                pb.SpecialToken(id=1, text="<|im_start|>"),
                pb.SpecialToken(id=2, text="<|im_end|>"),
            ],
            has_chat_template=True,
            weights_format="f32",
            limits=pb.Limits(
                max_top_n=20,
                max_stop_strings=16,
                max_stop_chars=256,
                max_request_bytes=1 << 20,
                kv_cache_tokens=4096,
                max_queue=64,
                max_batch_tokens=512,
            ),
            defaults=pb.Defaults(
                sampling=pb.SamplingParams(temperature=0.7, top_k=0, top_p=0.95, repetition_penalty=1.0),
                max_new_tokens=256,
            ),
            parameters=1_234_567,
        )


@pytest.fixture(scope="module")
def server():
    """A threaded gRPC server on a free loopback port: the fake servicer, plus grpc.health.v1 when installed."""
    service = FakeInference()
    # A threaded server gives each open stream a worker until its handler returns (the slow streams' and
    # the Health/Watch of client-side health checking among them): with 6 workers, two Sessions once waited
    # past their deadline beside a CPU hog, most likely for a worker.
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    nextword_pb2_grpc.add_InferenceServicer_to_server(service, grpc_server)
    try:
        from grpc_health.v1 import health, health_pb2_grpc

        health_servicer = health.HealthServicer()
        health_servicer.set("nextword.v1.Inference", 1)  # SERVING: the client's balancing sends it calls
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    except ImportError:  # grpcio-health-checking is a server extra
        health_servicer = None
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}", service, health_servicer
    grpc_server.stop(0)


@pytest.fixture
def fake(server):
    _, service, _ = server
    service.requests.clear()
    service.ended.clear()
    service.slow_sent = 0
    return service


@pytest.fixture
def client(server):
    with Client(server[0], timeout=10) as c:
        yield c


# ---- protobuf -> dataclasses ----


def test_every_message_converts_to_frozen_dataclasses():
    token = Token.from_pb(token_pb(1, " world", 2))
    assert (token.id, token.text, token.prob, token.index, token.elapsed_ms) == (101, " world", 0.5, 1, 2.5)
    assert token.logprob == pytest.approx(math.log(0.5))
    assert [(t.token_id, t.text, t.prob) for t in token.top] == [(200, "alt0", 0.5), (201, "alt1", 0.25)]
    assert token.top[1].logprob == pytest.approx(math.log(0.25))

    finish = Finish.from_pb(FINISH)
    assert (finish.reason, finish.stop, finish.seed) == ("stop", "\n", 42)
    assert (finish.usage.prompt_tokens, finish.usage.generated_tokens) == (4, 3)
    assert finish.timings.ttft_ms == 12.0 and finish.timings.tokens_per_s == 50.0
    names = [Finish.from_pb(pb.Finish(reason=r)).reason for r in pb.FinishReason.values()]
    assert names == [
        "unspecified",
        "length",
        "eos",
        "stop",
        "stop_token",
        "cancelled",
        "time",
        "lines",
        "superseded",
    ]
    assert Finish.from_pb(pb.Finish(reason=99)).reason == "99"  # a reason from a newer server

    event = GenerateEvent.from_pb(pb.GenerateEvent(request_id="r", text="a", token=token_pb(0, "a", 0)))
    assert event.finish is None and event.token.top == ()
    final = GenerateEvent.from_pb(pb.GenerateEvent(request_id="r", finish=FINISH))
    assert final.token is None and final.finish == finish

    completion = Completion.from_pb(
        pb.CompleteResponse(request_id="r", text="ab", tokens=[token_pb(0, "a", 0)], finish=FINISH)
    )
    assert completion.text == "ab" and len(completion.tokens) == 1 and completion.finish.reason == "stop"

    logprobs = np.log(VOCAB_PROBS)
    dist = Distribution.from_pb(
        pb.NextTokenProbabilitiesResponse(
            top=[pb.TokenProb(token_id=0, text="t0", prob=0.5)], logprobs=logprobs.tobytes(), vocab_size=8
        )
    )
    assert dist.logprobs.dtype == np.float32 and np.array_equal(dist.logprobs, logprobs)
    assert not dist.logprobs.flags.writeable
    assert Distribution.from_pb(pb.NextTokenProbabilitiesResponse()).logprobs is None

    tokenized = Tokenized.from_pb(pb.TokenizeResponse(ids=[1, 2], tokens=["a", "b"]))
    assert tokenized == Tokenized((1, 2), ("a", "b"))

    info = ModelInfo.from_pb(FakeInference().ModelInfo(None, None))
    assert info.defaults == {
        "temperature": 0.7,  # the float32 on the wire, read back as the value that was meant
        "top_k": 0,
        "top_p": 0.95,
        "repetition_penalty": 1.0,
        "max_new_tokens": 256,
    }
    assert info.limits.max_top_n == 20 and info.special_tokens[0] == SpecialToken(1, "<|im_start|>")
    assert info.eos_token_ids == (2,) and info.parameters == 1_234_567

    with pytest.raises(AttributeError):
        token.id = 5  # frozen
    for obj in (token, finish, event, final, completion, dist, tokenized, info):
        assert json.loads(json.dumps(obj.to_dict())) == obj.to_dict()
    assert dist.to_dict()["logprobs"] == pytest.approx(logprobs.tolist())
    assert event.to_dict()["token"]["top"] == [] and final.to_dict()["token"] is None


# ---- generate ----


def test_generate_yields_events_in_order_then_finish(client, fake):
    events = list(client.generate("hello", top_n=2, request_id="r1"))
    assert [e.text for e in events] == REPLY
    assert [e.token.index for e in events] == [0, 1, 2]
    assert all(e.request_id == "r1" for e in events)
    assert all(len(e.token.top) == 2 for e in events)
    assert [e.finish is None for e in events] == [True, True, False]
    assert events[-1].finish == Finish.from_pb(FINISH)
    assert fake.requests[-1].top_n == 2


def test_a_final_event_without_token(client, fake):
    events = list(client.generate("cancelled"))
    assert events[-1].token is None and events[-1].finish.reason == "cancelled"


def test_leaving_generate_early_cancels_the_rpc(client, fake):
    for _ in client.generate("slow"):
        break
    assert fake.ended.wait(SAFETY_S), "the server did not see the cancellation"
    assert fake.slow_sent == 1

    fake.ended.clear()
    stream = client.generate("slow")
    next(stream)
    stream.close()
    assert fake.ended.wait(SAFETY_S)


def test_generate_starts_nothing_until_iterated(client, fake):
    stream = client.generate("hello")
    assert fake.requests == []
    assert next(stream).text == "Hello"
    stream.close()


def test_stream_deadline_raises_deadline_exceeded(client, fake):
    with pytest.raises(DeadlineExceeded) as e:
        list(client.generate("slow", timeout=0.2))
    assert e.value.code_name == "DEADLINE_EXCEEDED"


def test_error_after_some_events(client, fake):
    seen = []
    with pytest.raises(Unavailable, match="shutting down"):
        for event in client.generate("fail-midway"):
            seen.append(event.text)
    assert seen == REPLY[:2]


# ---- errors ----

ERRORS = [
    (
        "bad-field",
        InvalidArgument,
        "INVALID_ARGUMENT",
        "temperature must be in [0, 100]",
        "sampling.temperature",
        None,
    ),
    ("busy", ResourceExhausted, "RESOURCE_EXHAUSTED", "the queue is full", None, 2.5),
    ("loading", Unavailable, "UNAVAILABLE", "the model is still loading; retry shortly", None, None),
    ("boom", Internal, "INTERNAL", "engine failure", None, None),
    ("denied", NextwordError, "PERMISSION_DENIED", "no", None, None),
]


@pytest.mark.parametrize(("prompt", "cls", "code_name", "message", "field", "retry"), ERRORS)
@pytest.mark.parametrize("how", ["generate", "complete"])
def test_typed_errors(client, fake, how, prompt, cls, code_name, message, field, retry):
    with pytest.raises(NextwordError) as caught:
        if how == "generate":
            list(client.generate(prompt))
        else:
            client.complete(prompt)
    e = caught.value
    assert type(e) is cls
    assert (e.code_name, e.message, e.field, e.retry_after_s) == (code_name, message, field, retry)
    assert e.code == getattr(grpc.StatusCode, code_name)
    assert str(e) == f"{code_name}: {message}"
    assert e.__cause__ is None and e.__suppress_context__  # `raise ... from None`: no grpc noise


def test_unreachable_server_is_unavailable():
    with Client("127.0.0.1:1") as c, pytest.raises(Unavailable):
        c.model_info(timeout=5)


# ---- requests ----


def test_prompt_forms_map_to_the_oneof(client, fake):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for prompt, which in [
        ("hello", "text"),
        ([1, 2, 3], "token_ids"),
        (np.array([4, 5], np.int64), "token_ids"),
        (chat, "chat"),
    ]:
        client.complete(prompt)
        assert fake.requests[-1].prompt.WhichOneof("input") == which
    assert list(fake.requests[1].prompt.token_ids.ids) == [1, 2, 3]
    assert list(fake.requests[2].prompt.token_ids.ids) == [4, 5]
    messages = fake.requests[3].prompt.chat.messages
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief."), ("user", "Hi")]

    for bad in (42, b"hello", {"role": "user", "content": "x"}, ["a", 1], [1.5]):
        with pytest.raises(TypeError, match="prompt must be"):
            client.generate(bad)
    with pytest.raises(ValueError, match="'content'"):
        client.generate([{"role": "user"}])
    assert len(fake.requests) == 4


def test_sampling_keywords(client, fake):
    with pytest.raises(TypeError, match="temprature"):
        client.generate("hello", temprature=0.5)  # raised at the call, before any iteration
    with pytest.raises(TypeError, match="unknown sampling"):
        client.complete("hello", beam_width=4)
    assert fake.requests == []

    client.complete("hello", max_new_tokens=None, temperature=None, top_k=None, seed=None, stop=None)
    request = fake.requests[-1]
    for name in ("temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty"):
        assert not request.sampling.HasField(name)
    assert not request.HasField("max_new_tokens") and not request.sampling.stop

    client.complete(
        "hello",
        max_new_tokens=10,
        temperature=0.0,  # set to zero is not the same as unset
        top_k=3,
        top_p=0.5,
        seed=7,
        stop="\n",
        stop_token_ids=(2,),
        logit_bias={5: -100},
        ignore_eos=True,
    )
    request = fake.requests[-1]
    s = request.sampling
    assert request.max_new_tokens == 10
    assert s.HasField("temperature") and s.temperature == 0.0
    assert (s.top_k, s.top_p, s.seed, list(s.stop), list(s.stop_token_ids)) == (3, 0.5, 7, ["\n"], [2])
    assert dict(s.logit_bias) == {5: -100.0} and s.ignore_eos


# ---- the other RPCs ----


def test_unary_calls(client, fake):
    completion = client.complete("hello", top_n=1)
    assert completion.text == "Hello world!" and [t.text for t in completion.tokens] == REPLY
    assert completion.finish.reason == "stop" and completion.tokens[0].top[0].text == "alt0"

    dist = client.next_token_probabilities("hello", top_n=3)
    assert [t.token_id for t in dist.top] == [0, 1, 2] and dist.logprobs is None
    assert (dist.prompt_tokens, dist.vocab_size) == (3, 8)
    assert fake.requests[-1].top_n == 3 and not fake.requests[-1].full_vocabulary
    full = client.next_token_probabilities([1, 2], top_n=0, full_vocabulary=True)
    assert full.top == () and full.logprobs.shape == (8,)
    assert np.allclose(np.exp(full.logprobs), VOCAB_PROBS)

    assert client.tokenize("The cat sat") == Tokenized((504, 505, 506), ("The", " cat", " sat"))
    chat = client.tokenize([{"role": "user", "content": "Hi"}])
    assert (
        chat.tokens == ("<|im_start|>", "Hi", "<|im_end|>")
        and fake.requests[-1].WhichOneof("input") == "chat"
    )

    assert client.detokenize([1, 7, 2]) == "<1><7><2>"
    assert client.detokenize([1, 7, 2], skip_special_tokens=True) == "<7>"

    info = client.model_info()
    assert info.model_id == "Fake-1M" and info.has_chat_template and info.context_length == 2048

    with pytest.raises(InvalidArgument) as e:
        client.next_token_probabilities("bad-field")
    assert e.value.field == "sampling.temperature"


def test_health_and_wait_until_ready(server, client, monkeypatch):
    health_servicer = server[2]
    if health_servicer is None:
        pytest.skip("grpcio-health-checking is not installed")
    from grpc_health.v1 import health_pb2

    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert client.health() == "NOT_SERVING"
    with pytest.raises(TimeoutError, match="NOT_SERVING"):
        client.wait_until_ready(timeout=0.3)

    seen, polled = [], threading.Event()
    call = client._call

    def observed_call(*args, **kwargs):  # the statuses wait_until_ready gets, in order
        status = call(*args, **kwargs)
        seen.append(status)
        polled.set()
        return status

    def flip():  # SERVING only once the client has probed and seen NOT_SERVING
        assert polled.wait(SAFETY_S)
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    monkeypatch.setattr(client, "_call", observed_call)
    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        client.wait_until_ready(timeout=SAFETY_S)
    finally:
        flipper.join()
        monkeypatch.undo()
    assert seen[0] == "NOT_SERVING" and seen[-1] == "SERVING"  # it polled until the status changed
    assert client.health() == "SERVING"
    with pytest.raises(NextwordError) as e:
        client.health("no.such.Service")
    assert e.value.code_name == "NOT_FOUND"


def test_wait_until_ready_before_the_server_listens():
    pytest.importorskip("grpc_health")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    with socket.socket() as s:  # a free port, for a server that starts a little later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, late)
    late.add_insecure_port(f"127.0.0.1:{port}")
    timer = threading.Timer(0.3, late.start)
    timer.start()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_until_ready(timeout=10)
            assert c.health() == "SERVING"
    finally:
        timer.join()
        late.stop(0)


# ---- AsyncClient ----


def test_async_client(server, fake):
    async def scenario():
        async with AsyncClient(server[0], timeout=10) as c:
            events = [e async for e in c.generate("hello", top_n=1, request_id="a1")]
            info = await c.model_info()
            with pytest.raises(InvalidArgument) as bad:
                await c.complete("bad-field")
            with pytest.raises(ResourceExhausted) as busy:
                async for _ in c.generate("busy"):
                    pass
            with pytest.raises(TypeError):
                c.generate("hello", temprature=1)

            stream = c.generate("slow")
            await stream.__anext__()
            await stream.aclose()
            closed = await asyncio.to_thread(fake.ended.wait, SAFETY_S)

            fake.ended.clear()
            async for _ in c.generate("slow"):
                break  # asyncio finalizes the abandoned iterator, which cancels the call
            broke = await asyncio.to_thread(fake.ended.wait, SAFETY_S)
        return events, info, bad.value, busy.value, closed, broke

    events, info, bad, busy, closed, broke = asyncio.run(scenario())
    assert [e.text for e in events] == REPLY and events[-1].finish.reason == "stop"
    assert events[0].request_id == "a1" and len(events[0].token.top) == 1
    assert info.model_id == "Fake-1M"
    assert (bad.code_name, bad.field) == ("INVALID_ARGUMENT", "sampling.temperature")
    assert busy.retry_after_s == 2.5
    assert closed and broke


# ---- the CLI ----


def test_cli_complete_streams_text(server, fake, capsys):
    assert main(["complete", "hello", "--target", server[0]]) == 0
    out, err = capsys.readouterr()
    assert out == "Hello world!\n"
    assert "[stop: '\\n'; 4 prompt + 3 generated tokens; first token 12 ms; 50.0 tokens/s; seed 42]" in err
    request = fake.requests[-1]
    assert request.prompt.text == "hello" and request.max_new_tokens == 64 and request.top_n == 0
    assert (
        request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    )  # greedy, explicitly

    assert main(["complete", "hi", "--chat", "--stop", "\n", "--seed", "3", "--target", server[0]]) == 0
    request = fake.requests[-1]
    assert request.prompt.chat.messages[0].content == "hi" and request.sampling.seed == 3
    assert list(request.sampling.stop) == ["\n"]


def test_cli_complete_json_and_show_probs(server, fake, capsys):
    assert main(["complete", "hello", "--json", "--target", server[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 3 and all(
        set(e) == {"request_id", "token", "text", "finish", "replica"} for e in events
    )
    assert events[-1]["finish"]["reason"] == "stop" and events[-1]["finish"]["usage"]["generated_tokens"] == 3
    assert events[0]["token"]["id"] == 100

    assert main(["complete", "hello", "--show-probs", "--top-n", "2", "--target", server[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and fake.requests[-1].top_n == 2
    assert lines[0].split() == ["'Hello'", "0.500", "|", "'alt0'", "0.500", "'alt1'", "0.250"]


def test_cli_errors_exit_1(server, capsys):
    assert main(["complete", "bad-field", "--target", server[0]]) == 1
    assert "error: INVALID_ARGUMENT: temperature must be in [0, 100]" in capsys.readouterr().err
    assert main(["probs", "busy", "--target", server[0]]) == 1
    assert capsys.readouterr().err == "error: RESOURCE_EXHAUSTED: the queue is full\n"
    assert main(["info", "--target", "127.0.0.1:1", "--timeout", "5"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_cli_probs(server, fake, capsys):
    assert main(["probs", "hello", "--top-n", "3", "--target", server[0]]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "id", "token", "prob", "logprob"]
    assert lines[1].split() == ["1", "0", "'t0'", "0.5000", "-0.6931"]
    assert len(lines) == 4 and "3 prompt tokens" in err

    assert main(["probs", "hi", "--chat", "--json", "--target", server[0]]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"top", "logprobs", "prompt_tokens", "vocab_size"} and len(data["top"]) == 8
    assert fake.requests[-1].prompt.WhichOneof("input") == "chat"


def test_cli_tokenize_detokenize_info(server, fake, capsys, monkeypatch):
    monkeypatch.setenv("NEXTWORD_TARGET", server[0])  # the default --target
    assert main(["tokenize", "The cat"]) == 0
    out, err = capsys.readouterr()
    assert out == "504 'The'\n505 ' cat'\n" and "[2 tokens]" in err
    assert main(["tokenize", "The cat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ids": [504, 505], "tokens": ["The", " cat"]}

    assert main(["detokenize", "1", "7", "--skip-special-tokens"]) == 0
    assert capsys.readouterr().out == "<7>\n"
    assert main(["detokenize", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"text": "<7>"}

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Fake-1M" in out and "1,234,567" in out and "temperature=0.7" in out and "max_top_n=20" in out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["limits"]["kv_cache_tokens"] == 4096 and info["defaults"]["max_new_tokens"] == 256


def test_cli_chat_keeps_history(server, fake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nhow are you?\n/reset\nagain\n/exit\nnever sent\n"))
    assert main(["chat", "--system", "Be brief.", "--target", server[0]]) == 0
    out, err = capsys.readouterr()
    assert out == "Hello world!\n" * 3 and "[conversation cleared]" in err
    conversations = [[(m.role, m.content) for m in r.prompt.chat.messages] for r in fake.requests]
    assert conversations == [
        [("system", "Be brief."), ("user", "hi")],
        [("system", "Be brief."), ("user", "hi"), ("assistant", "Hello world!"), ("user", "how are you?")],
        [("system", "Be brief."), ("user", "again")],
    ]
    assert fake.requests[0].max_new_tokens == 256

    # an error is reported, the turn dropped, and the chat goes on
    monkeypatch.setattr(sys, "stdin", io.StringIO("bad-field\nhi\n"))
    assert main(["chat", "--target", server[0]]) == 1
    out, err = capsys.readouterr()
    assert "error: INVALID_ARGUMENT" in err and out == "Hello world!\n"
    assert [(m.role, m.content) for m in fake.requests[-1].prompt.chat.messages] == [("user", "hi")]


def test_cli_broken_pipe_is_quiet(server):
    words = " ".join(["word"] * 20000)  # ~300 KB of output: more than a pipe buffer
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextword.client.cli", "tokenize", words, "--target", server[0]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"504 'word'\n"
    proc.stdout.close()  # like `| head -1`
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()


def test_import_does_not_pull_in_the_engine():
    code = (
        "import nextword.client, sys; assert 'numba' not in sys.modules and not any("
        "m.startswith(('nextword.server', 'nextword.kernels', 'nextword.weights')) for m in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- the new request fields, usage and limits ----


def test_time_and_line_limits_and_cached_tokens(client, fake):
    client.complete("hello", max_time_ms=250, max_lines=1)
    list(client.generate("hello", max_new_tokens=16, max_time_ms=1000, max_lines=2))
    complete, generate = fake.requests[-2:]
    assert (complete.max_time_ms, complete.max_lines) == (250, 1)
    assert (generate.max_new_tokens, generate.max_time_ms, generate.max_lines) == (16, 1000, 2)
    client.complete("hello")
    assert not fake.requests[-1].HasField("max_time_ms") and not fake.requests[-1].HasField("max_lines")

    finish = Finish.from_pb(
        pb.Finish(reason=pb.FINISH_REASON_LINES, usage=pb.Usage(prompt_tokens=9, cached_prompt_tokens=8))
    )
    assert finish.reason == "lines" and finish.usage == Usage(9, 0, 8)
    assert Finish.from_pb(FINISH).usage.cached_prompt_tokens == 0
    assert finish.to_dict()["usage"] == {"prompt_tokens": 9, "generated_tokens": 0, "cached_prompt_tokens": 8}

    limits = client.model_info().limits
    assert (limits.max_queue, limits.max_batch_tokens, limits.kv_cache_tokens) == (64, 512, 4096)


# ---- sessions ----


def test_session_error_converts():
    error = SessionError.from_pb(
        pb.SessionError(request_id="r", code="INVALID_ARGUMENT", message="m", field="f")
    )
    assert error == SessionError("r", "INVALID_ARGUMENT", "m", "f")
    assert SessionError.from_pb(pb.SessionError(request_id="r", code="INTERNAL")).field is None
    assert error.to_dict() == {
        "request_id": "r",
        "code_name": "INVALID_ARGUMENT",
        "message": "m",
        "field": "f",
    }
    with pytest.raises(AttributeError):
        error.message = "x"  # frozen


def check_session_items(items, ids):
    first, bad, typed, auto = ids
    assert auto and auto not in (first, bad, typed)  # made up by the client
    assert [(i.request_id, i.text) for i in items[:3]] == [(first, t) for t in REPLY]
    assert items[2].finish.reason == "stop"
    assert items[3] == SessionError(
        bad, "INVALID_ARGUMENT", "temperature must be in [0, 100]", "sampling.temperature"
    )
    assert items[4].request_id == typed and items[4].token is None and items[4].finish.reason == "superseded"
    assert [i.request_id for i in items[5:]] == [auto] * 3
    assert len(items) == 8


def test_async_session(server, fake):
    async def scenario():
        async with AsyncClient(server[0], timeout=10) as c:
            async with c.session() as s:
                ids = [
                    await s.send("hello", request_id="k1", max_new_tokens=16, max_lines=1, temperature=0.0),
                    await s.send("bad-field", request_id="k2"),
                    await s.send("typing", request_id="k3", max_time_ms=300),
                    await s.send([1, 2, 3]),
                ]
                items = []
                async for item in s:
                    items.append(item)
                    if len(items) == 8:
                        break
                await s.close()
                with pytest.raises(RuntimeError, match="closed"):
                    await s.send("hello")
                rest = [item async for item in s]  # the stream has ended: nothing more, and no error

            # close() drains: the events still arrive after it, and iteration then ends
            s = c.session()
            await s.send("hello", request_id="d1")
            await s.close()
            drained = [item async for item in s]
            again = [item async for item in s]
        return ids, items, rest, drained, again

    ids, items, rest, drained, again = asyncio.run(scenario())
    check_session_items(items, ids)
    assert rest == [] and again == []
    assert [e.text for e in drained] == REPLY and {e.request_id for e in drained} == {"d1"}
    first, typed = fake.requests[0], fake.requests[2]
    assert (first.max_new_tokens, first.max_lines, first.sampling.temperature) == (16, 1, 0.0)
    assert first.sampling.HasField("temperature") and typed.max_time_ms == 300
    assert list(fake.requests[3].prompt.token_ids.ids) == [1, 2, 3]


def test_async_session_failure_and_cancel(server, fake):
    async def scenario():
        async with AsyncClient(server[0], timeout=10) as c:
            s = c.session()
            await s.send("hello")
            aborted = await s.send("abort")
            seen, reconnects = [], []
            with pytest.raises(Unavailable, match="draining"):
                async for item in s:
                    if isinstance(item, SessionReconnected):
                        reconnects.append(item)
                    else:
                        seen.append(item.text)
            await s.close()  # the error was raised to the iteration already: close() is quiet
            # UNAVAILABLE: the replica went away; the session tried new streams, resending the unanswered
            # request, until MAX_RECONNECTS of them in a row had failed before their first event
            assert len(reconnects) == MAX_RECONNECTS
            assert all(r.cause == "UNAVAILABLE" and r.resent == aborted for r in reconnects)

            unseen = c.session()
            await unseen.send("abort")
            with pytest.raises(Unavailable):
                await unseen.close()  # nobody iterated: close() reports the failure

            with pytest.raises(KeyError):
                async with c.session() as cancelled:
                    await cancelled.send("hello")
                    raise KeyError("leaving the block by an exception cancels the session")
            after_cancel = [item async for item in cancelled]  # ends quietly (maybe with what had arrived)
            with pytest.raises(RuntimeError):
                await cancelled.send("hello")
        return seen, after_cancel

    seen, after_cancel = asyncio.run(scenario())
    assert seen == REPLY and len(after_cancel) <= 3


class OneWriteAtATimeCall:
    """A stand-in for a grpc.aio stream-stream call that keeps gRPC core's rule: one write in flight at a time
    (a second one fails the call on the client's side: GRPC_CALL_ERROR_TOO_MANY_OPERATIONS). A write stays
    in flight until the test lets it through, so the overlap does not depend on the machine's speed."""

    def __init__(self):
        self.written, self.through = [], asyncio.Event()
        self._writing, self._failed, self.cancelled = False, False, False
        self._end = asyncio.Event()

    async def write(self, request) -> None:
        if self._writing or self._failed:
            self._failed = True  # what grpc.aio does: the call is over here, and cancel() no longer reaches
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, None, None, "Internal error from Core")
        self._writing = True
        await self.through.wait()
        self._writing = False
        self.written.append(request.request_id)

    async def read(self):
        await self._end.wait()
        return grpc.aio.EOF

    async def done_writing(self) -> None:
        self._end.set()

    def cancel(self) -> bool:
        self.cancelled = not self._failed
        self._end.set()
        return self.cancelled

    def done(self) -> bool:
        return self._end.is_set() or self._failed


def test_async_session_sends_from_concurrent_tasks():
    """An editor answers each keystroke in a task of its own, so sends overlap. A second write while the first
    was in flight failed the call on the client's side only ("Internal error from Core"): the server was never
    told, and its generation ran on beside the next session's (the flaky burst test in test_editors.py).
    Every send must reach the stream, one at a time, in order."""

    async def scenario():
        call = OneWriteAtATimeCall()
        stub = SimpleNamespace(Session=lambda timeout: call)
        s = AsyncSession(stub, None)
        sends = [asyncio.ensure_future(s.send("hello", request_id=f"k{i}")) for i in range(3)]
        await asyncio.sleep(0)  # each task has started its send
        call.through.set()
        ids = await asyncio.gather(*sends, return_exceptions=True)
        await s.close()
        return ids, call.written

    ids, written = asyncio.run(scenario())
    assert ids == ["k0", "k1", "k2"]
    assert written == ["k0", "k1", "k2"]


def test_suggester_logs_an_in_band_session_error(server, fake):
    """A request the server refuses in-band (a SessionError) is answered empty and logged once."""
    from nextword.client.suggest import Connection, Context, Settings, Suggester

    logs = []

    async def scenario():
        async with AsyncClient(server[0], timeout=10) as c:
            suggester = Suggester(Connection(lambda: c, logs.append))
            text = await asyncio.wait_for(suggester.suggest(Context("", "bad-field", ""), Settings()), 10)
            await suggester.close()
            return text

    assert asyncio.run(scenario()) == ""
    assert logs == ["nextword: INVALID_ARGUMENT: temperature must be in [0, 100]"]


def test_sync_session_reconnects_when_the_server_ends_it_unanswered(client, fake):
    """A draining replica ends each Session after its live request, dropping one it has not started: the
    session opens a new stream, sends that request again, and says so."""
    fake.drained = False
    with client.session() as s:
        s.send("hello", request_id="h1")
        s.send("drain", request_id="d1")
        items = []
        for item in s:
            items.append(item)
            if getattr(item, "finish", None) is not None and item.request_id == "d1":
                break
    told = [i for i in items if isinstance(i, SessionReconnected)]
    assert told == [SessionReconnected(previous_replica="", cause="OK", resent="d1", superseded=())]
    after = items[items.index(told[0]) + 1 :]
    assert [e.text for e in after] == REPLY and {e.request_id for e in after} == {"d1"}
    assert [prompt_text(r.prompt) for r in fake.requests] == ["hello", "drain", "drain"]


@pytest.mark.parametrize(
    "target, loopback",
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("10.0.0.5:50051", False),
        ("ipv4:127.0.0.1:50051,127.0.0.2:50052", True),
        ("ipv4:127.0.0.1:50051,10.0.0.5:50051", False),  # every address must be this machine
        ("ipv6:[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("dns://8.8.8.8/localhost:50051", True),  # the authority is the DNS server, not the target
        ("dns:///nextword-headless:50051", False),
        ("unix:/run/nextword.sock", True),
    ],
)
def test_every_target_form_is_judged_loopback_or_not(target, loopback):
    """A token goes without TLS only to this machine: judged over every address of any gRPC target."""
    assert is_loopback_target(target) is loopback


def test_sync_session(client, fake):
    with client.session() as s:
        ids = [
            s.send("hello", request_id="k1", max_new_tokens=16, max_lines=1, temperature=0.0),
            s.send("bad-field", request_id="k2"),
            s.send("typing", request_id="k3", max_time_ms=300),
            s.send([1, 2, 3]),
        ]
        items = [next(s) for _ in range(8)]
    check_session_items(items, ids)
    assert list(s) == []
    with pytest.raises(RuntimeError, match="closed"):
        s.send("hello")
    assert fake.requests[0].max_lines == 1 and fake.requests[2].max_time_ms == 300

    s = client.session()
    s.send("hello", request_id="d1")
    s.close(timeout=5)  # drains
    assert [e.text for e in s] == REPLY

    s = client.session()
    s.send("abort")
    with pytest.raises(Unavailable, match="draining"):
        list(s)
    s.close(timeout=5)  # already raised to the iteration

    s = client.session()
    s.send("abort")
    with pytest.raises(Unavailable):
        s.close(timeout=5)
