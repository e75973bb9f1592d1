"""The OpenAI-compatible HTTP API, driven by the official `openai` client, against the gRPC API of the same
server (the reference: both front ends delegate to the same engine-facing code)."""

import asyncio
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from servers import running_server, wait_idle
from tiny_models import write_tiny_model

from nextword.client import Client

pytestmark = pytest.mark.real_model
PROMPT = "The capital of France is"
HTTP = httpx.Client(timeout=300)  # for the routes the openai client has no method for; a busy machine is slow


@pytest.fixture(scope="module")
def srv(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def oai(srv):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="-", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(srv):
    with Client(f"127.0.0.1:{srv.port}") as c:
        yield c


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


def test_models_health_tokenize_detokenize(srv, oai, grpc_client, model):
    info = grpc_client.model_info()
    assert model == info.model_id
    base = f"http://127.0.0.1:{srv.http_port}"
    assert HTTP.get(f"{base}/health").status_code == 200
    ids = HTTP.post(f"{base}/tokenize", json={"prompt": PROMPT}).json()
    assert ids["tokens"] == list(grpc_client.tokenize(PROMPT).ids) and ids["count"] == len(ids["tokens"])
    assert ids["max_model_len"] == info.context_length
    chat = HTTP.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == list(grpc_client.tokenize([{"role": "user", "content": "Hi"}]).ids)
    assert HTTP.post(f"{base}/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": PROMPT}


def test_completion_whole_and_streamed_equal_grpc(srv, oai, grpc_client, model):
    expect = grpc_client.complete(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True)
    whole = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert whole.choices[0].text == expect.text and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (5, 12)
    chunks = list(
        oai.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expect.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    raw = HTTP.post(
        f"http://127.0.0.1:{srv.http_port}/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 2, "stream": True},
    ).text
    assert raw.endswith("data: [DONE]\n\n") and raw.count("data: ") == 3


def test_n_choices_use_consecutive_seeds(oai, grpc_client, model):
    """n=2 with seed s: choice i is the gRPC generation with seed s + i, for each of two prompts."""
    prompts = [PROMPT, "Once upon a time"]
    got = oai.completions.create(model=model, prompt=prompts, n=2, seed=11, max_tokens=8, temperature=1.0)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for c in got.choices:
        expect = grpc_client.complete(
            prompts[c.index // 2], max_new_tokens=8, temperature=1.0, seed=11 + c.index % 2
        )
        assert c.text == expect.text
    again = oai.completions.create(model=model, prompt=prompts, n=2, seed=11, max_tokens=8, temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in got.choices]


def test_echo_logprobs_equal_the_score_rpc(oai, grpc_client, model):
    """echo + logprobs (what evaluation harnesses ask for log-likelihoods): the prompt tokens'
    log-probabilities and alternatives are the Score RPC's, within 1e-4; then the generated tokens'."""
    text = "The quick brown fox jumps over the lazy dog."
    scores = grpc_client.score(text, top_n=3)
    got = oai.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = got.choices[0].logprobs
    assert got.choices[0].text == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[1:] == [t.text for t in scores.tokens]
    np.testing.assert_allclose(lp.token_logprobs[1:], [t.logprob for t in scores.tokens], rtol=0, atol=1e-4)
    for alts, t in zip(lp.top_logprobs[1:], scores.tokens, strict=True):
        assert list(alts) == [a.text for a in t.top]
        np.testing.assert_allclose(list(alts.values()), [a.logprob for a in t.top], atol=1e-4)
    assert lp.text_offset[:3] == [0, 3, 9]  # "The", " quick", " brown"
    more = oai.completions.create(
        model=model, prompt=text, max_tokens=3, echo=True, logprobs=1, temperature=0
    )
    lp2 = more.choices[0].logprobs
    assert lp2.token_logprobs[: len(lp.tokens)] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert len(lp2.tokens) == len(lp.tokens) + 3 and more.choices[0].text.startswith(text)


def test_chat_whole_and_streamed_with_logprobs(oai, grpc_client, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expect = grpc_client.complete(messages, max_new_tokens=10, temperature=0, top_n=2)
    kwargs = {"model": model, "messages": messages, "max_tokens": 10, "temperature": 0}
    kwargs |= {"logprobs": True, "top_logprobs": 2}
    whole = oai.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expect.text
    content = choice.logprobs.content
    assert [c.token for c in content] == [t.text for t in expect.tokens]
    np.testing.assert_allclose([c.logprob for c in content], [t.logprob for t in expect.tokens], atol=1e-6)
    assert [[a.token for a in c.top_logprobs] for c in content] == [
        [a.text for a in t.top] for t in expect.tokens
    ]
    assert whole.usage.completion_tokens == len(expect.tokens)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expect.text
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs) == len(content)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings(oai, grpc_client, model):
    expect = grpc_client.complete(PROMPT, max_new_tokens=20, temperature=0, stop=["."])
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0, stop=".")
    assert got.choices[0].text == expect.text == " Paris" and got.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 99}, "logprobs"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"presence_penalty": "lots"}, "presence_penalty"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_a_bad_value_is_a_400_naming_the_param(oai, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model, **({"prompt": PROMPT} | kwargs))
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


def test_unknown_model_is_a_404(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-5", prompt=PROMPT)
    assert e.value.body["param"] == "model"


def test_an_abandoned_request_frees_its_sequence(srv, model):
    """A client that leaves a stream half-way: its sequence is cancelled at the engine's next step (2000
    tokens would take far longer than wait_idle's 5 s to finish on their own)."""
    cancelled = srv.metrics.requests.labels("CANCELLED")
    before = cancelled._value.get()
    url = f"http://127.0.0.1:{srv.http_port}/v1/completions"
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with HTTP.stream("POST", url, json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert srv.runner.engine.live_sequences == 1
    assert wait_idle(srv) == 0
    assert cancelled._value.get() == before + 1
    del body["stream"]  # a client that gives up waiting for a whole (unstreamed) response: the same
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", srv.http_port)) as sock:
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        while srv.runner.engine.live_sequences == 0:
            time.sleep(0.01)
    assert wait_idle(srv) == 0
    assert cancelled._value.get() == before + 2


def test_overload_is_a_429_with_retry_after_and_draining_a_503(tmp_path_factory):
    """A server whose queue holds one request: with the engine thread held between two steps, a second
    waiting request is refused with 429 and Retry-After; a body over --max-request-bytes with 413; while
    draining, 503."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_model(folder, "llama", seed=3)
    with running_server(model=folder, max_queue=1, http_port=0) as srv:
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="-", max_retries=0)
        gate = threading.Event()
        srv.runner.call(gate.wait)  # the engine thread waits here: nothing leaves the queue
        first = []
        waiter = threading.Thread(target=lambda: first.append(oai.completions.create(model="", prompt="hi", max_tokens=2)))  # fmt: skip
        waiter.start()
        while srv.runner.engine.waiting_sequences < 1:
            gate.wait(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            oai.completions.create(model="", prompt="hello", max_tokens=2)
        assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
        assert "waiting" in e.value.body["message"]
        gate.set()
        waiter.join(30)
        assert first[0].usage.completion_tokens == 2
        too_big = HTTP.post(
            f"http://127.0.0.1:{srv.http_port}/v1/completions", json={"prompt": "x" * (1 << 20)}
        )
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        srv.frontend.draining = True
        try:
            with pytest.raises(openai.InternalServerError) as e:
                oai.completions.create(model="", prompt="hi", max_tokens=2)
            assert e.value.status_code == 503
            assert HTTP.get(f"http://127.0.0.1:{srv.http_port}/health").status_code == 503
        finally:
            srv.frontend.draining = False


def test_load_generator_drives_the_http_api(srv):
    """`nextword load --protocol http`: the same workload and measurements as over gRPC."""
    from nextword.client.load import LoadConfig, run_load

    config = LoadConfig(
        target=f"127.0.0.1:{srv.http_port}", protocol="http", concurrency=2, num_requests=4,
        prompt_tokens=8, output_tokens=5, seed=1,
    )  # fmt: skip
    d = asyncio.run(run_load(config)).to_dict()
    assert d["completed"] == 4 and d["failed"] == 0 and d["total_output_tokens"] == 20
    assert d["total_input_tokens"] == 32 and d["protocol"] == "http" and d["median_ttft_ms"] > 0


def test_the_servers_token_guards_the_http_api_too(tmp_path_factory):
    """With a token (--token-file), HTTP needs it as the bearer token (the OpenAI clients' api_key), as gRPC."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_model(folder, "llama", seed=3)
    with running_server(model=folder, http_port=0, token="s3cret") as srv:
        base = f"http://127.0.0.1:{srv.http_port}/v1"
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401
        assert openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0).models.list().data[0].id
        assert HTTP.get(f"http://127.0.0.1:{srv.http_port}/health").status_code == 200
