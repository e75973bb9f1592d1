"""Public behaviour on the paths users run, through gRPC on a real server (a tiny model, float32 weights so
that every token can be checked against the float64 reference): the sampling controls and their finish
reasons, the published defaults, a prompt longer than --max-batch-tokens, the server while it loads, the
server's flags and their NEXTWORD_* fallbacks, and `nextword pull`.

Greedy paths are compared with the reference's own greedy path under the documented rules of
server/sampling.py (bias, then the repetition penalty, then presence/frequency); each comparison first checks
that the reference's top-2 gap is far above the float32 error (1e-4 on these logits), so it cannot flip."""

import threading

import numpy as np
import pytest
import reference as ref
from servers import SAFETY_S, START_S, event_loop_thread, running_server, server_config, wait_until
from tiny_models import write_tiny_model

from nextword.client import Client, Unavailable
from nextword.client.cli import main
from nextword.client.client import PROBE_SERVICE_CONFIG
from nextword.server.engine import Engine
from nextword.server.sampling import SamplingParams
from nextword.server.serve import NextwordServer, ServerConfig

MAX_BATCH_TOKENS = 16
PROMPT = "The quick brown fox jumps over"
N = 10  # tokens per checked generation
F32_BOUND = 1e-4  # the engine's float32 logits against float64 (test_model.py)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_paths")
    write_tiny_model(folder, "llama", seed=11, aligned=True, context=512)
    return folder


@pytest.fixture(scope="module")
def loaded(folder):
    return ref.load_reference(folder)


@pytest.fixture(scope="module")
def server(folder):
    with running_server(
        model=folder, weights="f32", kv_cache_tokens=2048, max_batch_tokens=MAX_BATCH_TOKENS, max_step_ms=None
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=SAFETY_S) as c:
        yield c


@pytest.fixture(scope="module")
def prompt_ids(client):
    return list(client.tokenize(PROMPT).ids)


def reference_greedy(loaded, prompt_ids, n=N, bias=None, repetition=1.0, presence=0.0, frequency=0.0):
    """The greedy path after the documented logit processing, in float64; and its smallest top-2 gap."""
    ids, gaps = list(prompt_ids), []
    for _ in range(n):
        logits = ref.reference_logits(loaded, ids)[-1].copy()  # [V]
        for token, b in (bias or {}).items():
            logits[token] += b
        seen = np.unique(ids)  # prompt + generated
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
        counts = np.bincount(ids[len(prompt_ids) :], minlength=len(logits))  # generated only
        logits -= presence * (counts > 0) + frequency * counts
        second, best = np.sort(logits)[-2:]
        gaps.append(best - second)
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt_ids) :], min(gaps)


def generated(client, prompt, **kwargs):
    done = client.complete(prompt, **{"max_new_tokens": N, "temperature": 0.0, "ignore_eos": True} | kwargs)
    return [t.id for t in done.tokens], done


# ---- the sampling controls ----


def test_greedy_follows_the_reference(client, loaded, prompt_ids):
    expect, gap = reference_greedy(loaded, prompt_ids)
    assert gap > 10 * F32_BOUND
    assert generated(client, PROMPT)[0] == expect


@pytest.mark.parametrize(
    "kwargs",
    [{"repetition_penalty": 3.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.5}],
    ids=lambda kw: next(iter(kw)),
)
def test_penalties_follow_the_reference(client, loaded, prompt_ids, kwargs):
    names = {
        "repetition_penalty": "repetition",
        "presence_penalty": "presence",
        "frequency_penalty": "frequency",
    }
    expect, gap = reference_greedy(loaded, prompt_ids, **{names[k]: v for k, v in kwargs.items()})
    plain, _ = reference_greedy(loaded, prompt_ids)
    assert gap > 10 * F32_BOUND and expect != plain  # the penalty changes the path: the check is not vacuous
    assert generated(client, PROMPT, **kwargs)[0] == expect


def test_logit_bias_forces_and_bans(client, loaded, prompt_ids):
    plain, _ = reference_greedy(loaded, prompt_ids)
    banned, forced = plain[0], 77
    bias = {banned: -100.0, forced: 5.0}
    expect, gap = reference_greedy(loaded, prompt_ids, bias=bias)
    assert gap > 10 * F32_BOUND and expect != plain
    got, _ = generated(client, PROMPT, logit_bias=bias)
    assert got == expect and banned not in got
    got, _ = generated(client, PROMPT, logit_bias={forced: 100.0})
    assert got == [forced] * N


def test_top_k_and_min_p_keep_what_they_must(client, loaded, prompt_ids):
    """Sampled at temperature 1 with top_k=3 (min_p=0.6): every step's reported distribution is the reference's
    softmax over exactly its 3 largest logits (the tokens with p >= 0.6 p_max), and the draw is one of them."""
    for kwargs in ({"top_k": 3}, {"min_p": 0.6}):
        done = client.complete(
            PROMPT, max_new_tokens=6, temperature=1.0, seed=3, top_n=20, ignore_eos=True, **kwargs
        )
        ids = list(prompt_ids)
        for token in done.tokens:
            p = ref.softmax(ref.reference_logits(loaded, ids)[-1])
            kept = np.argsort(-p)[:3] if "top_k" in kwargs else np.flatnonzero(p >= 0.6 * p.max())
            expect = dict(zip(kept.tolist(), p[kept] / p[kept].sum(), strict=True))
            assert {t.token_id for t in token.top} == set(expect) and token.id in expect
            for t in token.top:
                assert t.prob == pytest.approx(expect[t.token_id], abs=1e-5)
            ids.append(token.id)
        assert done.finish.reason == "length"
    # top_k=1 and min_p=1 keep the argmax alone: any seed gives the greedy path
    greedy, _ = generated(client, PROMPT)
    for kwargs in ({"top_k": 1, "seed": 1}, {"min_p": 1.0, "seed": 2}):
        assert generated(client, PROMPT, temperature=1.5, **kwargs)[0] == greedy


def test_stop_token_ids_and_stop_strings_finish(client, prompt_ids, loaded):
    greedy, _ = reference_greedy(loaded, prompt_ids)
    stop_at = next(i for i, t in enumerate(greedy) if greedy.index(t) == i and i >= 2)  # a first occurrence
    got, done = generated(client, PROMPT, stop_token_ids=[greedy[stop_at]])
    assert got == greedy[: stop_at + 1] and done.finish.reason == "stop_token"
    assert done.finish.stop == client.detokenize([greedy[stop_at]])
    text = client.detokenize(greedy)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    _, done = generated(client, PROMPT, stop=[stop])
    assert done.finish.reason == "stop" and done.finish.stop == stop
    assert done.text == text[: text.index(stop)]  # cut right before the stop string, not a character late


def test_max_time_with_an_injected_clock(client, server):
    """The engine's clock reads a quarter second per engine step: max_time_ms=1000 ends the generation at
    the 4th step after it was submitted, after 3 tokens, whatever the wall clock says."""
    engine = server.runner.engine
    engine.clock = lambda: 0.25 * engine.steps
    try:
        _, done = generated(client, PROMPT, max_new_tokens=50, max_time_ms=1000)
    finally:
        engine.clock = Engine.__init__.__kwdefaults__["clock"]
    assert done.finish.reason == "time" and done.finish.usage.generated_tokens == 3


def test_published_defaults_are_what_an_absent_field_gets(client):
    """ModelInfo's defaults, sent explicitly, give what a request without those fields gets; and an absent
    max_new_tokens generates the published number of tokens."""
    defaults = dict(client.model_info().defaults)
    max_new = defaults.pop("max_new_tokens")
    assert {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"} <= set(defaults)
    absent = client.complete(PROMPT, max_new_tokens=12, seed=9, top_n=3, ignore_eos=True)
    explicit = client.complete(PROMPT, max_new_tokens=12, seed=9, top_n=3, ignore_eos=True, **defaults)
    assert [(t.id, t.prob) for t in absent.tokens] == [(t.id, t.prob) for t in explicit.tokens]
    changed = client.complete(
        PROMPT, max_new_tokens=12, seed=9, top_n=3, ignore_eos=True, **defaults | {"temperature": 0.5}
    )
    assert [t.prob for t in changed.tokens] != [t.prob for t in absent.tokens]  # the comparison can fail
    done = client.complete(PROMPT, temperature=0.0, ignore_eos=True)
    assert (done.finish.reason, done.finish.usage.generated_tokens) == ("length", max_new)


# ---- a prompt longer than --max-batch-tokens ----


def test_a_long_prompt_is_prefilled_in_chunks(client, server, folder, loaded):
    """A 70-token prompt goes through in chunks of 16 (steps whose logits rows are "none"): its next-token
    distribution is the reference's, and its generation is the unchunked engine's."""
    text = "The server streams tokens and their probabilities over gRPC. " * 3
    ids = list(client.tokenize(text).ids)
    assert len(ids) > 4 * MAX_BATCH_TOKENS
    engine, step, tokens_per_step = server.runner.engine, server.runner.engine.step, []

    def counted_step():
        tokens_per_step.append(step())
        return tokens_per_step[-1]

    engine.step = counted_step
    try:
        probs = client.next_token_probabilities(ids, top_n=5, full_vocabulary=True)
        wait_until(lambda: sum(tokens_per_step) == len(ids), "the last step returns (it answered inside)")
    finally:
        engine.step = step
    full, rest = divmod(len(ids), MAX_BATCH_TOKENS)
    assert tokens_per_step == [MAX_BATCH_TOKENS] * full + [rest] * (rest > 0)  # the answer after the last
    expect = ref.log_softmax(ref.reference_logits(loaded, ids)[-1])
    np.testing.assert_allclose(probs.logprobs, expect, rtol=0, atol=F32_BOUND)

    whole = Engine.load(folder, weights="f32", kv_cache_tokens=1024, max_batch_tokens=1024, max_step_s=None)
    steps = list(whole.generate(ids, SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)))
    assert whole.steps == N  # unchunked: the prompt in one step
    assert [s.token.token_id for s in steps] == generated(client, ids)[0]


def test_prompts_share_the_token_budget(folder):
    """Three long prompts and a decoding sequence at once: no step carries more than --max-batch-tokens, and
    every result equals its unchunked run."""
    # Steps sized in tokens only (max_step_s=None), so the chunk sizes asserted below are the budget's.
    chunked = Engine.load(
        folder, weights="f32", kv_cache_tokens=1024, max_batch_tokens=MAX_BATCH_TOKENS, max_step_s=None
    )
    whole = Engine.load(folder, weights="f32", kv_cache_tokens=1024, max_batch_tokens=1024, max_step_s=None)
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [[5 + i, *range(20 + i, 60 + i)] for i in range(3)] + [[7, 8]]
    outs = [[] for _ in prompts]
    for prompt, out in zip(prompts, outs, strict=True):
        chunked.submit(prompt, params, out.append)
    batches = []
    while chunked.has_work():
        chunked.step()
        batches.append(chunked.last_batch[1])
    assert max(batches) == MAX_BATCH_TOKENS and sum(batches) == sum(map(len, prompts)) + 3 * len(prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        expect = [s.token.token_id for s in whole.generate(prompt, params)]
        assert [s.token.token_id for s in out] == expect


# ---- the server while it loads ----


def test_unavailable_with_retry_info_while_loading(folder, monkeypatch):
    """Until the model is loaded: health NOT_SERVING, every RPC UNAVAILABLE with a RetryInfo; then SERVING.
    The load is held by an event the test releases."""
    release = threading.Event()
    load = NextwordServer._load_engine

    def held_load(self):
        assert release.wait(SAFETY_S)
        return load(self)

    monkeypatch.setattr(NextwordServer, "_load_engine", held_load)
    with event_loop_thread() as run:
        srv = NextwordServer(server_config(model=folder, weights="f32", kv_cache_tokens=256))
        port = run(srv.start())
        try:
            # without health gating (the default client sends nothing to a replica not SERVING): the calls
            # reach the loading server, which answers them
            ungated = {"grpc.service_config": PROBE_SERVICE_CONFIG}
            with Client(f"127.0.0.1:{port}", timeout=SAFETY_S, options=ungated) as c:
                assert c.health() == "NOT_SERVING"
                for call in (
                    c.model_info,
                    lambda: c.tokenize("hi"),
                    lambda: c.complete("hi", max_new_tokens=2),
                ):
                    with pytest.raises(Unavailable) as e:
                        call()
                    assert e.value.retry_after_s == 1.0 and "loading" in e.value.message
                release.set()
                run(srv.wait_ready(), START_S)
                assert c.health() == "SERVING"
                assert c.complete("hi", max_new_tokens=2, ignore_eos=True).finish.usage.generated_tokens == 2
        finally:
            release.set()
            run(srv.stop(1))


# ---- flags and their NEXTWORD_* fallbacks ----

SERVE_FLAGS = [  # flag, environment variable, value, ServerConfig field, parsed value
    ("--weights", "WEIGHTS", "int8", "weights", "int8"),
    ("--host", "HOST", "::1", "host", "::1"),
    ("--port", "PORT", "51234", "port", 51234),
    ("--kv-cache-tokens", "KV_CACHE_TOKENS", "777", "kv_cache_tokens", 777),
    ("--kv-cache-dtype", "KV_CACHE_DTYPE", "f16", "kv_cache_dtype", "f16"),
    ("--max-batch-tokens", "MAX_BATCH_TOKENS", "33", "max_batch_tokens", 33),
    ("--max-context", "MAX_CONTEXT", "99", "max_context", 99),
    ("--max-top-n", "MAX_TOP_N", "7", "max_top_n", 7),
    ("--max-queue", "MAX_QUEUE", "5", "max_queue", 5),
    ("--metrics-port", "METRICS_PORT", "51235", "metrics_port", 51235),
    ("--max-request-bytes", "MAX_REQUEST_BYTES", "4096", "max_request_bytes", 4096),
    ("--grace", "GRACE", "2.5", "grace_s", 2.5),
]


def serve_config(monkeypatch, folder, argv) -> ServerConfig:
    return serve_config_of(monkeypatch, ["--model", str(folder), *argv])


def serve_config_of(monkeypatch, argv) -> ServerConfig:
    """The ServerConfig `nextword serve ARGV` would serve (the server itself is not started)."""
    import nextword.server.serve as serve_module

    seen = []

    async def capture(config):
        seen.append(config)
        return 0

    monkeypatch.setattr(serve_module, "serve", capture)
    monkeypatch.setattr("nextword.server.memory.use_server_malloc_policy", lambda: None)
    monkeypatch.setattr("nextword.kernels.cache_loading.lean_cache_loads", lambda: None)
    assert main(["serve", *argv]) == 0
    return seen[0]


def test_serve_flags_and_their_environment_fallbacks(monkeypatch, folder, capsys):
    defaults = serve_config(monkeypatch, folder, [])
    assert defaults == ServerConfig(model=folder)  # no flag, no variable: the documented defaults
    for flag, var, value, field, parsed in SERVE_FLAGS:
        assert getattr(serve_config(monkeypatch, folder, [flag, value]), field) == parsed, flag
        monkeypatch.setenv("NEXTWORD_" + var, value)
        assert getattr(serve_config(monkeypatch, folder, []), field) == parsed, var
        other = {"int8": "f32", "::1": "127.0.0.1", "f16": "f32"}.get(value) or str(parsed + 1)
        config = serve_config(monkeypatch, folder, [flag, other])
        assert str(getattr(config, field)) == other, f"{flag} wins over NEXTWORD_{var}"
        monkeypatch.delenv("NEXTWORD_" + var)
    monkeypatch.setenv("NEXTWORD_METRICS_PORT", "-1")
    assert serve_config(monkeypatch, folder, []).metrics_port is None  # -1: no metrics endpoint
    monkeypatch.delenv("NEXTWORD_METRICS_PORT")
    monkeypatch.setenv("NEXTWORD_MODEL", str(folder))
    assert serve_config_of(monkeypatch, []).model == folder
    capsys.readouterr()
