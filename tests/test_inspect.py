"""The inspection forward (nextword.kernels.inspect) against the float64 reference, on tiny random models:

- the attention-weights kernel equals reference.attention_weights on odd shapes (GQA included);
- per-layer hidden states, attention weights, the final hidden state and the last logits of a tiny Llama (GQA)
  and GPT-2 equal tests/reference.py's trace; the averaged maps are the means of the single ones;
- embeddings (per token, per sentence) and the nearest-token search against plain NumPy;
- EngineThread.call runs work on the engine thread between steps;
- on SmolLM2, the inspection forward's last logits are the engine's.
"""

import threading

import numpy as np
import pytest
import reference as ref
from servers import SAFETY_S, wait_until
from tiny_models import write_tiny_model

from nextword.kernels import inspect
from nextword.kernels.model import Model
from nextword.kernels.softmax import log_softmax
from nextword.server import engine_thread
from nextword.server.engine import Engine
from nextword.server.engine_thread import EngineThread
from nextword.server.sampling import SamplingParams
from nextword.weights.loader import load_checkpoint

IDS = [5, 17, 42, 99, 3, 250, 7, 7, 31, 64, 200]


@pytest.mark.parametrize("H,Hkv,Dh,T", [(9, 3, 64, 1), (4, 4, 8, 7), (6, 2, 5, 13)])
def test_attention_weights_kernel(H, Hkv, Dh, T):
    rng = np.random.default_rng(H * T + Dh)
    qkv = (rng.standard_normal((T, (H + 2 * Hkv) * Dh)) * 2).astype(np.float32)
    out = np.full((H, T, T), np.nan, dtype=np.float32)
    inspect.attention_weights(out, qkv, np.float32(1 / np.sqrt(Dh)), H, Hkv)
    q = qkv[:, : H * Dh].reshape(T, H, Dh)
    k = qkv[:, H * Dh : (H + Hkv) * Dh].reshape(T, Hkv, Dh)
    np.testing.assert_allclose(out, ref.attention_weights(q, k), rtol=0, atol=1e-6)
    assert (out[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()  # exactly 0, not tiny


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_tiny_model(folder, request.param, seed=1)
    return Model(load_checkpoint(folder)), ref.reference_trace(folder, IDS)


def test_forward_matches_the_reference_trace(tiny):
    model, trace = tiny
    L = model.config.num_layers
    seen = {}
    run = inspect.forward(
        model,
        IDS,
        hidden_layers=range(L + 1),
        attention_layers=range(1, L + 1),
        on_attention=lambda k, w: seen.__setitem__(k, w.copy()),
        logits=True,
    )
    assert sorted(run.hidden) == list(range(L + 1)) and sorted(seen) == list(range(1, L + 1))
    for k in range(L + 1):
        np.testing.assert_allclose(run.hidden[k], trace["hidden"][k], rtol=0, atol=1e-5)
    for k in range(1, L + 1):
        assert seen[k].shape == (model.config.num_heads, len(IDS), len(IDS))
        np.testing.assert_allclose(seen[k], trace["attention"][k - 1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(run.final, trace["final"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(run.logits, trace["logits"][-1], rtol=0, atol=1e-4)
    assert trace["logits"].std() > 0.1


def test_forward_stops_after_the_last_layer_asked_for(tiny):
    model, trace = tiny
    run = inspect.forward(model, IDS, hidden_layers=[1], final=False)
    assert run.final is None and run.logits is None
    np.testing.assert_allclose(run.hidden[1], trace["hidden"][1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        inspect.forward(model, IDS, hidden_layers=[model.config.num_layers + 1])
    with pytest.raises(ValueError, match="tokens"):
        inspect.forward(model, [])


def test_attention_maps_are_means_of_the_single_ones(tiny):
    model, trace = tiny
    c = model.config
    single = np.array(
        [
            [inspect.attention(model, IDS, layer=k, head=h) for h in range(c.num_heads)]
            for k in range(1, c.num_layers + 1)
        ]
    )  # [L, H, T, T]
    np.testing.assert_allclose(single, np.array(trace["attention"]), rtol=0, atol=1e-6)
    for k in range(1, c.num_layers + 1):
        np.testing.assert_allclose(inspect.attention(model, IDS, layer=k), single[k - 1].mean(0), atol=1e-6)
    np.testing.assert_allclose(inspect.attention(model, IDS, head=1), single[:, 1].mean(0), atol=1e-6)
    mean = inspect.attention(model, IDS)
    np.testing.assert_allclose(mean, single.mean((0, 1)), atol=1e-6)
    np.testing.assert_allclose(mean.sum(1), 1.0, atol=1e-5)
    assert (mean[np.triu_indices(len(IDS), 1)] == 0).all()
    with pytest.raises(ValueError, match="head"):
        inspect.attention(model, IDS, head=c.num_heads)


def test_embeddings(tiny):
    model, trace = tiny
    L = model.config.num_layers
    rows, sentence = inspect.embed(model, IDS, layer=0)
    np.testing.assert_array_equal(rows, model.checkpoint.embed[IDS])  # the table rows, no position added
    mean = trace["final"].mean(0)
    np.testing.assert_allclose(sentence, mean / np.linalg.norm(mean), rtol=0, atol=1e-6)
    assert np.linalg.norm(sentence.astype(np.float64)) == pytest.approx(1.0, abs=1e-6)
    rows, again = inspect.embed(model, IDS, layer=L)
    np.testing.assert_allclose(rows, trace["hidden"][L], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(again, sentence)
    assert inspect.embed(model, IDS)[0] is None


def test_nearest_tokens(tiny):
    model, _ = tiny
    table = model.checkpoint.embed.astype(np.float64)  # [V, D]
    query = inspect.token_sum(model, [7, 42, 3], [1.0, -1.0, 0.5])
    np.testing.assert_allclose(query, table[7] - table[42] + 0.5 * table[3], rtol=0, atol=1e-6)
    cos = table @ query / (np.linalg.norm(table, axis=1) * np.linalg.norm(query))  # [V]
    ids, got = inspect.nearest_tokens(model, query, 5)
    assert list(ids) == list(np.argsort(-cos)[:5])
    np.testing.assert_allclose(got, cos[ids], rtol=0, atol=1e-6)
    ids, _ = inspect.nearest_tokens(model, query, 5, exclude=[7, 42, 3])
    assert (
        not {7, 42, 3} & set(ids.tolist())
        and list(ids) == [i for i in np.argsort(-cos) if i not in (7, 42, 3)][:5]
    )
    np.testing.assert_allclose(inspect.cosine(model, query, [7, 3]), cos[[7, 3]], rtol=0, atol=1e-6)


# ---- the engine thread runs inspection work between steps ----


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_thread")
    write_tiny_model(folder, "llama", seed=2)
    thread = EngineThread(Engine.load(folder, kv_cache_tokens=512, block_size=4))
    thread.start()
    yield thread
    thread.stop()


def test_call_runs_on_the_engine_thread(runner):
    assert runner.call(lambda: threading.current_thread().name).result(SAFETY_S) == "nextword-engine"
    failed = runner.call(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(SAFETY_S)
    assert runner.call(lambda: 42).result(SAFETY_S) == 42  # still serving after a failed call


def test_calls_interleave_with_a_running_generation(tmp_path):
    """Calls queued beside a generation run between its steps, while it runs: one per step when the engine is
    untimed (max_step_s=None; a timed one runs as many as fit in a step's time budget)."""
    write_tiny_model(tmp_path, "llama", seed=2)
    engine = Engine.load(tmp_path, kv_cache_tokens=512, block_size=4, max_step_s=None)
    thread = EngineThread(engine)  # not started: the generation and the calls are all queued first
    steps, done = [], threading.Event()

    def on_output(step):
        steps.append(engine.steps)
        if getattr(step, "finish", None):
            done.set()

    params = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    seq = thread.submit([5, 6, 7], params, on_output)
    calls = [thread.call(lambda: (engine.steps, seq.finished)) for _ in range(5)]
    thread.start()
    try:
        assert done.wait(SAFETY_S) and steps == list(range(1, 41))  # one token per step
        assert [c.result(SAFETY_S) for c in calls] == [(k, False) for k in range(5)]  # one call per step
    finally:
        thread.stop()


class IdleWatch(threading.Event):
    """An engine thread's wake event that counts the times the thread went idle (waited with no deadline)."""

    def __init__(self):
        super().__init__()
        self.idle = threading.Semaphore(0)

    def wait(self, timeout=None):
        if timeout is None:
            self.idle.release()
        return super().wait(timeout)


def test_freed_memory_is_released_once_per_idle_period(tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(engine_thread, "release_freed_memory", lambda: released.append(len(released)))
    write_tiny_model(tmp_path, "llama", seed=3)
    thread = EngineThread(Engine.load(tmp_path, kv_cache_tokens=64, block_size=4))
    thread._wake = watch = IdleWatch()
    thread.start()
    try:
        assert watch.idle.acquire(timeout=SAFETY_S)
        assert released == []  # idle from the start: nothing was done yet
        done = threading.Event()
        params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
        thread.submit([5, 6, 7], params, lambda step: getattr(step, "finish", None) and done.set())
        assert done.wait(SAFETY_S)
        wait_idle_after(watch, lambda: released)
        assert len(released) == 1  # released on going idle
        watch.set()  # a wake-up with nothing to do: still the same idle period
        assert watch.idle.acquire(timeout=SAFETY_S)
        assert len(released) == 1
        thread.call(lambda: None).result(SAFETY_S)
        wait_idle_after(watch, lambda: len(released) == 2)
        assert len(released) == 2  # a call is work too
    finally:
        thread.stop()


def test_freed_memory_is_released_every_so_often_while_busy(tmp_path, monkeypatch):
    """A server under steady load is never idle: it releases freed memory every RELEASE_EVERY_S of engine
    clock too (injected here: one second per step)."""
    write_tiny_model(tmp_path, "llama", seed=3)
    engine = Engine.load(tmp_path, kv_cache_tokens=64, block_size=4)
    engine.clock = lambda: float(engine.steps)
    released = []
    monkeypatch.setattr(engine_thread, "release_freed_memory", lambda: released.append(engine.steps))
    thread = EngineThread(engine)
    done = threading.Event()
    params = SamplingParams(temperature=0.0, max_new_tokens=35, ignore_eos=True)
    thread.submit([5, 6, 7], params, lambda step: getattr(step, "finish", None) and done.set())
    thread.start()  # busy from its first step to its ~36th
    try:
        assert done.wait(SAFETY_S)
    finally:
        thread.stop()
    busy = [steps for steps in released if steps < 35]
    assert busy == [10, 20, 30]  # every 10 steps (10 s of its clock), not only once idle


def wait_idle_after(watch: IdleWatch, condition) -> None:
    """Wait for the idle entries of the thread until `condition()` holds (each work period ends in one)."""
    while not condition():
        assert watch.idle.acquire(timeout=SAFETY_S), "the engine thread never went idle"


def test_cancelled_call_is_skipped_and_stop_fails_queued_calls(tmp_path):
    write_tiny_model(tmp_path, "llama", seed=3)
    thread = EngineThread(Engine.load(tmp_path, kv_cache_tokens=64, block_size=4))  # not started yet
    ran = []
    skipped = thread.call(lambda: ran.append("skipped"))
    assert skipped.cancel()
    queued = thread.call(lambda: ran.append("queued"))
    thread.start()
    assert queued.result(SAFETY_S) is None and ran == ["queued"]
    blocker, release = threading.Event(), threading.Event()
    thread.call(lambda: (blocker.set(), release.wait(SAFETY_S)))
    assert blocker.wait(SAFETY_S)
    never = thread.call(lambda: ran.append("never"))
    stopper = threading.Thread(target=thread.stop)
    stopper.start()
    wait_until(lambda: thread._stopping, "stop() has begun: the blocked call is the last to run")
    release.set()
    stopper.join(SAFETY_S)
    with pytest.raises(RuntimeError, match="stopped"):
        never.result(SAFETY_S)
    with pytest.raises(RuntimeError, match="stopped"):
        thread.call(lambda: None).result(SAFETY_S)
    assert ran == ["queued"]


# ---- the real model ----


@pytest.mark.real_model
@pytest.mark.parametrize(
    "prompt", ["The capital of France is", "I sat on the bank of the river", "def fibonacci(n):\n"]
)
def test_inspection_logits_equal_the_engines(smollm2, prompt):
    ids = smollm2.tokenizer.encode(prompt)
    run = inspect.forward(smollm2.model, ids, logits=True)
    logprobs = np.empty((1, run.logits.shape[0]), dtype=np.float32)
    log_softmax(logprobs, run.logits[None, :])
    expect = smollm2.next_token_probabilities(ids, top_n=1).logprobs
    np.testing.assert_allclose(logprobs[0], expect, rtol=0, atol=1e-4)
