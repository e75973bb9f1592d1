"""End to end over loopback: the real default model behind the gRPC service, called through the thin client."""

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from servers import StepGate, running_server, serve_argv, wait_idle

from nextword.client import Client, DeadlineExceeded, InvalidArgument, NextwordError
from nextword.client.cli import main as cli_main
from nextword.kernels import isa, quant
from nextword.server.sampling import SamplingParams

pytestmark = pytest.mark.real_model
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, there was a little robot who",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\n\n",
    "My favourite fruit is",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def server(smollm2_folder):
    with running_server(model=smollm2_folder, weights="f32", kv_cache_tokens=8192) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


def test_streamed_greedy_text_equals_in_process(client, smollm2):
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    expect = list(smollm2.generate(PROMPTS[0], params))
    events = list(client.generate(PROMPTS[0], max_new_tokens=24, temperature=0.0, top_n=3))
    assert [e.token.id for e in events] == [s.token.token_id for s in expect]
    assert "".join(e.text for e in events) == "".join(s.text for s in expect)
    final = events[-1].finish
    assert final.reason == expect[-1].finish.reason
    assert final.usage.prompt_tokens == 5 and final.usage.generated_tokens == len(events)
    assert final.timings.ttft_ms > 0 and final.timings.total_ms >= final.timings.ttft_ms
    assert [e.token.index for e in events] == list(range(len(events)))


def test_step_probabilities_agree_with_next_token_probabilities(client):
    events = list(client.generate(PROMPTS[1], max_new_tokens=6, temperature=0.0, top_n=5))
    prefix = client.tokenize(PROMPTS[1]).ids
    for e in events:
        dist = client.next_token_probabilities(list(prefix), top_n=5)
        assert [t.token_id for t in e.token.top] == [t.token_id for t in dist.top]
        np.testing.assert_allclose([t.prob for t in e.token.top], [t.prob for t in dist.top], atol=1e-4)
        assert e.token.id == dist.top[0].token_id  # greedy
        prefix = (*prefix, e.token.id)


def test_full_vocabulary_distribution(client, smollm2):
    dist = client.next_token_probabilities(PROMPTS[0], top_n=3, full_vocabulary=True)
    expect = smollm2.next_token_probabilities(PROMPTS[0], top_n=3)
    assert dist.logprobs.shape == (49152,) and dist.logprobs.dtype == np.float32
    np.testing.assert_allclose(dist.logprobs, expect.logprobs, atol=1e-4)
    assert np.exp(dist.logprobs.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)


def test_tokenize_detokenize_round_trip(client, smollm2):
    text = "Héllo wörld! 2024 ½ 日本語 😀\n  indented"
    tokens = client.tokenize(text)
    assert list(tokens.ids) == smollm2.tokenizer.encode(text)
    assert len(tokens.tokens) == len(tokens.ids)
    assert client.detokenize(list(tokens.ids)) == text
    chat = [{"role": "user", "content": "Hi"}]
    assert list(client.tokenize(chat).ids) == smollm2.tokenizer.encode_chat(chat)
    assert client.detokenize([1, 504, 2], skip_special_tokens=True) == "The"


def test_complete_and_chat(client):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    done = client.complete(chat, max_new_tokens=30, temperature=0.0)
    assert "Paris" in done.text
    assert done.finish.reason in ("eos", "length")
    assert len(done.tokens) == done.finish.usage.generated_tokens


def test_stop_string_and_seed(client):
    done = client.complete(PROMPTS[0], max_new_tokens=20, temperature=0.0, stop=["."])
    assert done.text == " Paris" and done.finish.reason == "stop" and done.finish.stop == "."
    a = client.complete(PROMPTS[2], max_new_tokens=12, temperature=1.0, seed=7)
    b = client.complete(PROMPTS[2], max_new_tokens=12, temperature=1.0, seed=7)
    assert a.text == b.text and a.finish.seed == 7


def test_model_info(client):
    info = client.model_info()
    assert info.model_id == "SmolLM2-135M-Instruct" and info.architecture == "llama"
    assert info.vocab_size == 49152 and info.context_length == 8192
    assert info.limits.max_top_n == 20 and info.has_chat_template
    assert 2 in info.eos_token_ids
    assert info.kernel_path == ("avx2" if quant.HAVE_AVX2 else "portable")  # what the matmuls really run
    assert info.kv_cache_dtype == "f32"  # auto, with f32 weights
    assert info.instruction_set.startswith(("avx512 (LLVM cpu ", "avx2 (LLVM cpu ", "baseline (LLVM cpu "))


@pytest.mark.parametrize(
    "prompt,kwargs,field,words",
    [
        ("hi", {"max_new_tokens": 9000}, "max_new_tokens", ["9000", "8192", "1 tokens"]),
        ("", {}, "prompt.text", ["empty"]),
        ([5, 49152], {}, "prompt.token_ids", ["49152"]),
        ([], {}, "prompt.token_ids", ["empty"]),
        ("hi", {"top_n": 21}, "top_n", ["21"]),
        ("hi", {"temperature": -0.5}, "sampling.temperature", ["-0.5"]),
        ("hi", {"top_p": 0.0}, "sampling.top_p", ["(0, 1]"]),
        ("hi", {"top_p": 1.5}, "sampling.top_p", ["1.5"]),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens", ["max_new_tokens"]),
        ("hi", {"logit_bias": {70000: 1.0}}, "sampling.logit_bias", ["70000"]),
        ([{"role": "", "content": "x"}], {}, "prompt.chat.messages[0].role", ["role"]),
    ],
)
def test_invalid_fields_are_named(client, server, prompt, kwargs, field, words):
    with pytest.raises(InvalidArgument) as e:
        list(client.generate(prompt, **kwargs))
    assert e.value.code_name == "INVALID_ARGUMENT" and e.value.field == field
    for word in words:
        assert word in e.value.message
    assert wait_idle(server) == 0


def test_oversized_message_is_refused(client):
    with pytest.raises(NextwordError) as e:
        client.complete("word " * 300_000)
    assert e.value.code_name == "RESOURCE_EXHAUSTED"
    assert client.complete(PROMPTS[0], max_new_tokens=2).finish.usage.generated_tokens == 2  # still serving


def test_client_cancel_after_three_tokens_frees_the_sequence(client, server):
    events = client.generate(PROMPTS[2], max_new_tokens=500, ignore_eos=True)
    got = [next(events) for _ in range(3)]
    assert all(e.token for e in got)
    events.close()  # cancels the RPC
    assert wait_idle(server) == 0


def test_deadline_frees_the_sequence(client, server):
    """The engine is held (no step runs) while the deadline passes, so the generation cannot have ended on
    its own; once steps run again, the expired request is dropped at the next one."""
    engine = server.runner.engine
    gate, steps = StepGate(engine), engine.steps
    try:
        with pytest.raises(DeadlineExceeded):
            list(client.generate(PROMPTS[2], max_new_tokens=20, ignore_eos=True, timeout=0.2))
        assert engine.steps == steps  # the deadline, not the generation's end, stopped it: nothing ran
    finally:
        gate.open()
    assert wait_idle(server) == 0


def test_eight_concurrent_clients(server, smollm2):
    expect = {
        p: "".join(s.text for s in smollm2.generate(p, SamplingParams(temperature=0.0, max_new_tokens=16)))
        for p in PROMPTS
    }

    def one(prompt):
        with Client(f"127.0.0.1:{server.port}") as c:
            return prompt, "".join(e.text for e in c.generate(prompt, max_new_tokens=16, temperature=0.0))

    with ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(one, PROMPTS))
    assert results == expect
    assert wait_idle(server) == 0


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "nextword.v1.Inference" in services and "grpc.health.v1.Health" in services


def test_generated_code_is_not_stale(tmp_path):
    root = Path(__file__).parent.parent
    sys.path.insert(0, str(root / "proto"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    fresh = generate.main(out=tmp_path)
    for path in fresh:
        installed = root / "proto" / path.relative_to(tmp_path)
        assert installed.read_bytes() == path.read_bytes(), (
            f"{installed} is stale: run python proto/generate.py"
        )


def test_serve_command_health_and_graceful_shutdown(smollm2_folder):
    """`nextword serve`: NOT_SERVING until loaded and warm, then SERVING and one ready line; SIGTERM drains an
    in-flight stream and exits 0."""
    proc = subprocess.Popen(
        serve_argv(smollm2_folder, "--port", "0", "--metrics-port", "0", weights=None),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # the configuration, then "listening on"
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", lines[1]).group(1))
        seen = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(service="nextword.v1.Inference")).status
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.02)
        assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
        ready = proc.stdout.readline()
        assert "ready in" in ready and f" with {isa.target().kernels} kernels; " in ready  # which path runs

        with Client(f"127.0.0.1:{port}") as c:
            events = c.generate(PROMPTS[0], max_new_tokens=40, ignore_eos=True)
            next(events)
            proc.send_signal(signal.SIGTERM)
            rest = list(events)
        # the in-flight stream ends with a final event however slow the machine: finished within the
        # grace period, or cancelled by the drain past it (never a transport error)
        assert rest[-1].finish.reason in ("length", "cancelled")
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "shutting down" in out and "stopped" in out
    finally:
        proc.kill()


# ---- Score: every token's log-probability, against transformers and benchmarks/perplexity.py ----

SCORE_GOLDEN = json.loads((Path(__file__).parent / "golden" / "score.json").read_text())
ENGLISH = Path(__file__).parents[1] / "benchmarks" / "data" / "english.txt"


@pytest.mark.parametrize("case", SCORE_GOLDEN["cases"], ids=lambda c: repr(c["text"][:16]))
def test_score_matches_transformers(client, case):
    """The Score RPC on float32 weights: each token's log-probability within 1e-4 of transformers' (made
    by tests/golden/make_score_golden.py on the same float32 folder)."""
    scores = client.score(case["text"], top_n=2)
    assert [t.id for t in scores.tokens] == case["ids"][1:] and scores.prompt_tokens == len(case["ids"])
    assert [t.index for t in scores.tokens] == list(range(1, len(case["ids"])))
    got = np.array([t.logprob for t in scores.tokens])
    np.testing.assert_allclose(got, case["logprobs"], rtol=0, atol=1e-4)
    assert scores.sum_logprob == pytest.approx(sum(case["logprobs"]), abs=1e-3)
    assert scores.perplexity == pytest.approx(np.exp(-np.mean(case["logprobs"])), rel=1e-6)
    for t in scores.tokens:  # the rank agrees with the alternatives listed
        assert (t.rank == 1) == (t.top[0].token_id == t.id)
        assert t.top[0].logprob >= t.logprob - 1e-6


def test_score_cli_prints_the_perplexity_of_benchmarks_perplexity_py(server, smollm2, tmp_path, capsys):
    """`nextword score FILE --window W` prints the figure benchmarks/perplexity.py computes with windows of W
    on the same float32 weights, by its own code (one forward per window, outside the engine). On the first
    700 tokens of its english.txt with W = 256 (three windows, the last one short) to keep the suite fast; on
    the whole file with the defaults (1024) both print 14.665 (benchmarks/README.md)."""
    spec = importlib.util.spec_from_file_location("perplexity", ENGLISH.parents[1] / "perplexity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = smollm2.tokenizer
    text = tok.decode(tok.encode(ENGLISH.read_text())[:700])
    (tmp_path / "part.txt").write_text(text)
    ids = tok.encode(text)
    kv = "f32"  # what the server's KV cache holds with f32 weights
    nll, _ = bench.score(smollm2.model, ids, window=256, decode_path=False, kv=kv)
    target = f"127.0.0.1:{server.port}"
    assert cli_main(["score", str(tmp_path / "part.txt"), "--window", "256", "--target", target]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"perplexity {math.exp(nll.mean()):.3f} over {len(nll)} tokens")
    assert f"{len(ids)} tokens in 3 windows of 256, stride 256" in line


def test_score_windows_overlap_and_validation(client):
    text = ENGLISH.read_text()[:600]
    whole = client.score(text)
    windows = client.score(text, window=64, stride=32)
    assert windows.windows > 2 and windows.window == 64 and windows.stride == 32
    assert [t.index for t in windows.tokens] == [t.index for t in whole.tokens]  # every token, once
    first = 64  # the first window's tokens have the same context in both
    np.testing.assert_allclose(
        [t.logprob for t in windows.tokens[: first - 1]],
        [t.logprob for t in whole.tokens[: first - 1]],
        atol=1e-5,
    )
    chat = client.score([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    assert chat.tokens[-1].text == "\n"  # the conversation as it stands: no assistant turn opened after it
    for kwargs, field in [
        ({"window": 1}, "window"),
        ({"window": 64, "stride": 65}, "stride"),
        ({"top_n": 99}, "top_n"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            client.score(text, **kwargs)
        assert e.value.field == field
    with pytest.raises(InvalidArgument, match="at least 2 tokens"):
        client.score("Hi")
