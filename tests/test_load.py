"""The load generator (nextword.client.load and `nextword load`) against a fake in-process server: tokens 2 ms
apart, RESOURCE_EXHAUSTED on demand, a stall on demand, a barrier that proves requests overlap, and a Session
that supersedes (no model, no numba). The assertions are on counts and on the order of events, never on how
long something took: the sleeps only slow the fake down, and every assertion holds however slow the machine."""

import asyncio
import itertools
import json
import re
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from servers import wait_until

from nextword.client.cli import main
from nextword.client.load import LoadConfig, PromptMaker, arrival_offsets, run_load
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc

SAFETY_S = 60  # how long a wait for an event may take before the test fails: a hang guard, not a measure
VLLM_KEYS = [
    "duration",
    "completed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
] + [
    f"{stat}_{metric}_ms"
    for metric in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p90", "p99")
]
OUR_KEYS = [
    "errors",
    "concurrency",
    "rate",
    "scenario",
    "cancelled",
    "superseded",
    "answered",
    "cached_prompt_tokens",
]


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class FakeLoad(nextword_pb2_grpc.InferenceServicer):
    def __init__(self):
        self.reset()

    def reset(self):
        self.lock = threading.Lock()
        self.vocab: dict[str, int] = {}
        self.bos = None  # a token id Tokenize puts first, like a Llama tokenizer
        self.fail_every = 0  # "load-N" with N % fail_every == fail_every - 1 gets RESOURCE_EXHAUSTED
        self.token_s = 0.002
        self.stall: tuple[str, float] | None = None  # (request id, seconds before its first token)
        self.overlap: threading.Barrier | None = None  # the first parties requests wait for each other
        self.session_tokens = 3
        self.session_hold = False  # Session: answer only the last request (see Session)
        self.requests: list[pb.GenerateRequest] = []
        self.prompts: list[list[int]] = []
        self.cached: dict[str, int] = {}
        self.cancelled: set[str] = set()
        self.active = self.max_active = 0
        self.deadlines: list[float | None] = []  # each Generate's time remaining when it arrived

    def Tokenize(self, request, context):
        with self.lock:
            ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in re.findall(r" ?\S+", request.text)]
        if not ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give text or chat messages to tokenize")
        if self.bos is not None:
            ids = [self.bos, *ids, 2]  # like a tokenizer that adds BOS and EOS
        return pb.TokenizeResponse(ids=ids, tokens=["?"] * len(ids))

    def ModelInfo(self, request, context):
        special = [pb.SpecialToken(id=1, text="<s>"), pb.SpecialToken(id=2, text="</s>")]
        return pb.ModelInfoResponse(
            model_id="Fake-Load", vocab_size=100_000, context_length=4096, special_tokens=special
        )

    def Generate(self, request, context):
        rid, ids = request.request_id, list(request.prompt.token_ids.ids)
        with self.lock:
            self.requests.append(request)
            self.deadlines.append(context.time_remaining())
            cached = max((common_prefix(ids, p) for p in self.prompts), default=0)
            self.cached[rid] = cached
            self.prompts.append(ids)
        if (
            self.fail_every
            and rid.startswith("load-")
            and int(rid[5:]) % self.fail_every == self.fail_every - 1
        ):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full")
        finished = False

        def ended():
            if not finished:
                with self.lock:
                    self.cancelled.add(rid)

        context.add_callback(ended)
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.overlap and int(rid.rpartition("-")[2]) < self.overlap.parties:
                self.overlap.wait(SAFETY_S)  # these requests are all in flight at once, or the run fails
            if self.stall and self.stall[0] == rid:
                time.sleep(self.stall[1])
            n = request.max_new_tokens
            for i in range(n):
                time.sleep(self.token_s)
                event = pb.GenerateEvent(request_id=rid, token=pb.Token(id=7, text="x", index=i), text="x")
                if i == n - 1:
                    usage = pb.Usage(prompt_tokens=len(ids), generated_tokens=n, cached_prompt_tokens=cached)
                    event.finish.CopyFrom(pb.Finish(reason=pb.FINISH_REASON_LENGTH, usage=usage))
                    finished = True
                yield event
        finally:
            with self.lock:
                self.active -= 1

    def Session(self, request_iterator, context):
        """Requests in arrival order, no timing involved. By default each is answered in full as soon as it is
        read (`session_tokens` tokens, then FINISH_REASON_LINES). With `session_hold`, an answer waits: the
        next request supersedes it, and the last one is answered once the client closes its side (a user
        typing faster than any answer). max_new_tokens > 100 is refused in-band."""

        def finish(request, reason, generated):
            usage = pb.Usage(prompt_tokens=len(prompt_words(request)), generated_tokens=generated)
            event = pb.GenerateEvent(
                request_id=request.request_id, finish=pb.Finish(reason=reason, usage=usage)
            )
            return pb.SessionEvent(generate=event)

        def answer(request):
            for step in range(self.session_tokens):
                token = pb.Token(id=7, text="x", index=step)
                yield pb.SessionEvent(
                    generate=pb.GenerateEvent(request_id=request.request_id, token=token, text="x")
                )
            yield finish(request, pb.FINISH_REASON_LINES, self.session_tokens)

        held = None
        for request in request_iterator:
            with self.lock:
                self.requests.append(request)
            if request.max_new_tokens > 100:
                error = pb.SessionError(
                    request_id=request.request_id,
                    code="INVALID_ARGUMENT",
                    message="max_new_tokens is too large",
                    field="max_new_tokens",
                )
                yield pb.SessionEvent(error=error)
            elif not self.session_hold:
                yield from answer(request)
            else:
                if held is not None:
                    yield finish(held, pb.FINISH_REASON_SUPERSEDED, 0)
                held = request
        if held is not None:
            yield from answer(held)


def prompt_words(request) -> list[str]:
    return re.findall(r" ?\S+", request.prompt.text)


@pytest.fixture(scope="module")
def server():
    service = FakeLoad()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    nextword_pb2_grpc.add_InferenceServicer_to_server(service, grpc_server)
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        health_servicer = health.HealthServicer()
        for service_name in ("", "nextword.v1.Inference"):  # the client balances over SERVING replicas
            health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    except ImportError:  # grpcio-health-checking is a server extra: the probe accepts UNIMPLEMENTED
        pass
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}", service
    grpc_server.stop(0)


@pytest.fixture
def fake(server):
    server[1].reset()
    return server[1]


@pytest.fixture
def target(server):
    return server[0]


def load(target, **kwargs):
    return asyncio.run(run_load(LoadConfig(target=target, **kwargs)))


# ---- configuration and prompts ----


def test_config_is_checked():
    assert LoadConfig().concurrency == 1 and LoadConfig().num_requests == 100
    assert LoadConfig(duration=5).num_requests is None
    assert LoadConfig(prompt_tokens=7, output_tokens=(2, 9)).prompt_tokens == (7, 7)
    assert LoadConfig(rate=5).num_channels == 8 and LoadConfig(concurrency=3).num_channels == 3
    for bad in (
        {"concurrency": 2, "rate": 1.0},
        {"rate": 0},
        {"prompt_tokens": (9, 3)},
        {"output_tokens": 0},
        {"shared_prefix": 32},
        {"cancel_fraction": 1.5},
        {"scenario": "typist", "rate": 2.0},
        {"scenario": "nope"},
    ):
        with pytest.raises(ValueError):
            LoadConfig(**bad)


def test_prompt_maker_lengths_and_prefixes():
    maker = PromptMaker(lead=[1], body=list(range(100, 130)), shared=4)
    prompts = [maker.make(n, 50) for n in range(40)]
    assert all(len(p) == 50 for p in prompts)  # longer than the text: it repeats
    assert all(p[:4] == [1, 100, 101, 102] for p in prompts)
    assert len({tuple(p) for p in prompts}) == 40 and len({p[4] for p in prompts[:30]}) == 30
    assert prompts[0][4 + maker.digits :] == maker.text_ids(50 + maker.digits)[4 + maker.digits : 50]
    assert PromptMaker([1], list(range(100, 130)), shared=0).shared == 1  # the BOS stays first
    assert len(maker.make(3, 5)) == 5  # shorter than the header: cut


# ---- closed and open loop ----


def test_closed_loop_counts_are_exact(target, fake):
    fake.fail_every = 5
    fake.overlap = threading.Barrier(4)  # load-0..3 wait for each other: 4 in flight at once
    result = load(target, concurrency=4, num_requests=20, prompt_tokens=12, output_tokens=5)
    d = result.to_dict()
    assert (d["sent"], d["completed"], d["failed"]) == (20, 16, 4)
    assert d["errors"] == {"RESOURCE_EXHAUSTED": 4}
    assert (d["total_input_tokens"], d["total_output_tokens"]) == (16 * 12, 16 * 5)
    assert d["cached_prompt_tokens"] == 0  # distinct prompts share no prefix
    assert len(result.samples("ttft")) == 16 and len(result.samples("itl")) == 16 * 4
    assert len(result.samples("tpot")) == 16 and len(result.samples("e2el")) == 16
    completed = [r for r in result.records if r.error is None]
    assert d["median_itl_ms"] == round(1000 * np.median([g for r in completed for g in r.itl]), 4)
    assert all(sum(r.itl) == pytest.approx(r.last_token - r.first_token) for r in completed)
    assert d["median_e2el_ms"] > d["median_ttft_ms"]
    assert all(r.scheduled <= r.sent <= r.first_token <= r.last_token <= r.end for r in completed)
    assert d["request_throughput"] == pytest.approx(16 / d["duration"], rel=1e-3)
    assert d["output_throughput"] == pytest.approx(80 / d["duration"], rel=1e-3)

    requests = fake.requests
    assert sorted(r.request_id for r in requests) == sorted(f"load-{i}" for i in range(20))
    assert len({tuple(r.prompt.token_ids.ids) for r in requests}) == 20
    for r in requests:
        assert len(r.prompt.token_ids.ids) == 12 and r.max_new_tokens == 5 and r.sampling.ignore_eos
        assert r.sampling.HasField("temperature") and r.sampling.temperature == 0.0
    assert fake.max_active == 4
    assert all(key in d for key in VLLM_KEYS + OUR_KEYS)
    assert (d["concurrency"], d["rate"], d["scenario"]) == (4, None, "plain")
    assert json.loads(json.dumps(d)) == d


def test_ranges_shared_prefix_bos_and_warmup(target, fake):
    fake.bos = 1
    result = load(
        target,
        concurrency=1,
        num_requests=8,
        warmup=2,
        prompt_tokens=(10, 20),
        output_tokens=(2, 6),
        shared_prefix=6,
        seed=3,
    )
    d = result.to_dict()
    warmup, measured = fake.requests[:2], fake.requests[2:]
    assert [r.request_id for r in warmup] == ["warmup-0", "warmup-1"]
    assert [r.request_id for r in measured] == [f"load-{i}" for i in range(8)] and d["sent"] == 8
    ids = [list(r.prompt.token_ids.ids) for r in measured]
    assert all(10 <= len(x) <= 20 for x in ids) and len({len(x) for x in ids}) > 1
    assert all(x[0] == 1 for x in ids) and len({tuple(x[:6]) for x in ids}) == 1
    assert len({x[6] for x in ids}) == 8  # the prompts part right after the shared prefix
    outputs = [r.max_new_tokens for r in measured]
    assert all(2 <= n <= 6 for n in outputs) and len(set(outputs)) > 1
    assert d["total_output_tokens"] == sum(outputs) and d["total_input_tokens"] == sum(map(len, ids))
    assert all(fake.cached[r.request_id] >= 6 for r in measured[1:])
    assert d["cached_prompt_tokens"] == sum(fake.cached[r.request_id] for r in measured)


def test_a_seed_reproduces_the_requests(target, fake):
    def requests():
        fake.requests.clear()
        load(target, concurrency=3, num_requests=9, prompt_tokens=(8, 30), output_tokens=(1, 9), seed=7)
        return sorted((r.request_id, tuple(r.prompt.token_ids.ids), r.max_new_tokens) for r in fake.requests)

    first = requests()
    assert requests() == first and len({n for _, _, n in first}) > 1


def test_open_loop_follows_the_poisson_schedule(target, fake):
    expected = sum(1 for _ in itertools.takewhile(lambda t: t < 1.0, arrival_offsets(40, 1)))
    result = load(target, rate=40, duration=1.0, prompt_tokens=8, output_tokens=2, seed=1)
    d = result.to_dict()
    assert d["sent"] == expected and 20 <= expected <= 65
    assert d["completed"] == expected and d["rate"] == 40 and d["concurrency"] is None
    scheduled = sorted(r.scheduled - result.start for r in result.records)
    assert scheduled[-1] < 1.0 and d["duration"] >= scheduled[-1]
    assert scheduled == pytest.approx(list(itertools.islice(arrival_offsets(40, 1), expected)))  # the plan
    assert d["max_inflight_hits"] == 0

    assert load(target, rate=200, num_requests=10, prompt_tokens=8, output_tokens=2).to_dict()["sent"] == 10


def test_latency_counts_from_the_scheduled_time(target, fake):
    """Open loop, one request in flight at most, the first one stalls past the second's arrival: the second
    waits for the slot, and that wait is part of its TTFT (no coordinated omission)."""
    offsets = list(itertools.islice(arrival_offsets(50, 2), 2))
    fake.stall = ("load-0", offsets[1] + 0.05)  # load-0 is still running when load-1 is due
    result = load(target, rate=50, num_requests=3, max_inflight=1, prompt_tokens=8, output_tokens=2, seed=2)
    first, second, _ = sorted(result.records, key=lambda r: r.index)
    assert second.scheduled - first.scheduled == pytest.approx(offsets[1] - offsets[0])
    assert second.scheduled < first.end <= second.sent  # due while load-0 held the slot; sent once it ended
    d = result.to_dict()
    assert d["max_inflight_hits"] >= 1
    ttft = sorted(result.samples("ttft"))
    assert second.first_token - second.scheduled in ttft  # measured from the schedule, not from the send
    assert d["max_send_lag_ms"] == pytest.approx(1000 * max(r.sent - r.scheduled for r in result.records))
    assert d["max_send_lag_ms"] >= 1000 * (first.end - second.scheduled)  # the wait for the slot


def test_duration_bounds_a_closed_loop(target, fake):
    d = load(target, concurrency=2, duration=0.5, prompt_tokens=8, output_tokens=5).to_dict()
    # each request takes at least 5 tokens x 2 ms of the fake's sleeps: 2 workers fit at most 2 x 50 in 0.5 s
    # (without the duration the loop would never end: num_requests is None)
    assert d["completed"] == d["sent"] and 1 <= d["sent"] <= 2 * 50 + 2


# ---- scenarios ----


def test_cancel_storm(target, fake):
    result = load(
        target,
        scenario="cancel-storm",
        concurrency=4,
        num_requests=20,
        cancel_fraction=0.5,
        prompt_tokens=8,
        output_tokens=20,
        seed=5,
    )
    d = result.to_dict()
    assert (d["cancelled"], d["completed"], d["failed"]) == (10, 10, 0)
    cancelled = [r for r in result.records if r.cancelled]
    assert sorted(r.index for r in cancelled) == list(range(1, 20, 2))  # spread evenly
    assert all(1 <= r.tokens <= 5 for r in cancelled) and len({r.tokens for r in cancelled}) > 1
    assert d["total_output_tokens"] == 200 and len(result.samples("e2el")) == 10
    assert len(result.samples("ttft")) == 20  # a cancelled request's first token still counts
    assert d["healthy_after"] is True
    wait_until(lambda: len(fake.cancelled) >= 10, "the server sees the 10 cancellations")
    assert fake.cancelled == {r.request_id for r in cancelled}  # the server saw each cancellation


def test_typist_fast_typing_is_superseded(target, fake):
    fake.session_hold = True  # no answer comes before the next keystroke: typing faster than answers
    result = load(target, scenario="typist", concurrency=2, num_requests=12, keystroke_ms=3)
    d = result.to_dict()
    assert d["sent"] == 12 and d["failed"] == 0
    assert (d["answered"], d["superseded"], d["completed"]) == (2, 10, 12)  # each user's last is answered
    assert d["total_output_tokens"] == 2 * 3
    texts = {r.request_id: r.prompt.text for r in fake.requests}
    first_user = [texts[f"typist-0-{k}"] for k in range(1, 7)]
    assert first_user == ["Once upon a time, in a small village"[:k] for k in range(1, 7)]
    assert all(r.max_lines == 1 and r.max_new_tokens == 16 for r in fake.requests)
    assert fake.requests[0].sampling.HasField("temperature")
    assert all(key in d for key in ("mean_ttfe_ms", "p99_ttfe_ms"))


def test_typist_slow_typing_is_answered(target, fake):
    fake.session_tokens = 2  # every keystroke answered in full before the next is read
    result = load(target, scenario="typist", concurrency=1, num_requests=5, keystroke_ms=60)
    d = result.to_dict()
    assert (d["answered"], d["superseded"], d["failed"]) == (5, 0, 0)
    assert d["total_output_tokens"] == 10 and len(result.samples("e2el")) == 5
    records = sorted(result.records, key=lambda r: r.scheduled)
    assert np.diff([r.scheduled for r in records]) == pytest.approx([0.06] * 4)  # the typing plan
    assert all(r.scheduled <= r.sent <= r.first_token <= r.end for r in records)
    assert d["duration"] >= records[-1].scheduled - result.start


def test_typist_counts_in_band_errors(target, fake):
    d = load(
        target, scenario="typist", concurrency=1, num_requests=3, keystroke_ms=5, keystroke_tokens=200
    ).to_dict()
    assert d["errors"] == {"INVALID_ARGUMENT": 3} and d["completed"] == 0


def test_typist_against_a_server_without_sessions():
    class NoSessions(nextword_pb2_grpc.InferenceServicer):
        def ModelInfo(self, request, context):
            return pb.ModelInfoResponse(model_id="Old", context_length=512)

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    nextword_pb2_grpc.add_InferenceServicer_to_server(NoSessions(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        # keystrokes 200 ms apart: typing on would take 2 s; the UNIMPLEMENTED status comes back in one RTT
        result = load(
            f"127.0.0.1:{port}", scenario="typist", concurrency=2, num_requests=20, keystroke_ms=200
        )
    finally:
        grpc_server.stop(0)
    d = result.to_dict()
    assert list(d["errors"]) == ["UNIMPLEMENTED"] and d["failed"] == d["sent"] >= 2 and d["completed"] == 0
    assert d["sent"] < 20  # each user stopped typing once its session failed


# ---- the CLI ----


def test_cli_load(target, fake, capsys):
    args = ["load", "--target", target, "--concurrency", "2", "--num-requests", "6"]
    args += ["--prompt-tokens", "8", "--output-tokens", "3"]
    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert all(key in d for key in VLLM_KEYS + OUR_KEYS)
    assert d["completed"] == 6 and d["total_output_tokens"] == 18 and d["channels"] == 2
    assert "[done] 6/6 requests" in err  # stderr is not a terminal: plain lines

    assert main([*args[:-2], "--output-tokens-range", "2:4", "--json", "--detailed"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["requests"]) == 6 and all(2 <= r["output_tokens"] <= 4 for r in d["requests"])

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 sent, 6 completed, 0 failed" in out and "TTFT" in out and "E2E" in out

    fake.fail_every = 2
    assert main([*args, "--scenario", "cancel-storm"]) == 0
    out = capsys.readouterr().out
    assert "RESOURCE_EXHAUSTED 3" in out and "healthy afterwards      yes" in out

    for bad in (["--rate", "3"], ["--prompt-tokens-range", "9:3"], ["--output-tokens-range", "2:4"]):
        with pytest.raises(SystemExit) as e:
            main([*args, *bad])
        assert e.value.code == 2
    assert main([*args, "--shared-prefix", "40"]) == 2
    assert "shared_prefix" in capsys.readouterr().err


def test_cli_load_flags_reach_the_requests(target, fake, capsys):
    """Each `nextword load` flag does what it says to the requests the server sees."""
    base = ["load", "--target", target, "--json"]
    args = ["--rate", "500", "--num-requests", "6", "--max-inflight", "2", "--warmup", "2", "--channels", "3"]
    args += ["--prompt-tokens-range", "5:9", "--output-tokens", "3", "--temperature", "0.5", "--seed", "4"]
    assert main([*base, *args, "--timeout", "30"]) == 0
    d = json.loads(capsys.readouterr().out)
    ids = [r.request_id for r in fake.requests]
    assert sorted(ids[:2]) == ["warmup-0", "warmup-1"] and sorted(ids[2:]) == [f"load-{i}" for i in range(6)]
    assert (d["rate"], d["channels"], d["sent"]) == (500, 3, 6) and fake.max_active <= 2
    assert all(5 <= len(r.prompt.token_ids.ids) <= 9 for r in fake.requests[2:])
    assert all(r.max_new_tokens == 3 for r in fake.requests)
    assert all((r.sampling.temperature, r.sampling.seed) == (0.5, 4) for r in fake.requests)
    assert all(t is not None and 0 < t < 31 for t in fake.deadlines)  # --timeout 30: every call's deadline

    fake.reset()
    args = ["--concurrency", "2", "--num-requests", "8", "--scenario", "cancel-storm", "--cancel-fraction"]
    assert main([*base, *args, "0.25", "--prompt-tokens", "8", "--output-tokens", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["cancelled"] == 2
    assert sum(t > 1e6 for t in fake.deadlines) == 8  # no --timeout: no deadline (but the health probe's)

    fake.reset()
    args = ["--scenario", "typist", "--num-requests", "3", "--keystroke-ms", "1", "--keystroke-tokens", "7"]
    assert main([*base, *args]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 3
    assert [r.max_new_tokens for r in fake.requests] == [7, 7, 7]

    fake.reset()
    assert main([*base, "--duration", "0.2", "--prompt-tokens", "8", "--output-tokens", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["completed"] == d["sent"] >= 1  # ended by the duration (no --num-requests)
