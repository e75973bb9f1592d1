"""Serving many at once: batching changes no result, admission control, prefix cache, editor sessions, metrics."""

import asyncio
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import reference as ref
from servers import SAFETY_S, StepGate, running_server, wait_idle, wait_until
from tiny_models import write_tiny_model

from nextword.client import AsyncClient, Client, ResourceExhausted
from nextword.client.types import SessionError
from nextword.server.engine import Engine
from nextword.server.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_serving")
    write_tiny_model(folder, "llama", seed=7, aligned=True)  # widths of 32s: the server's q4 applies
    return folder


def test_overload_is_refused_quickly_and_the_admitted_complete(tiny_folder):
    """200 simultaneous requests against a queue of 32: the excess get RESOURCE_EXHAUSTED at once, every
    admitted request completes with the same text as alone, and the server ends healthy and idle."""
    with running_server(model=tiny_folder, max_queue=32, kv_cache_tokens=512) as srv:
        target = f"127.0.0.1:{srv.port}"
        with Client(target) as c:
            expect = c.complete(
                "The quick brown fox", max_new_tokens=16, temperature=0.0, ignore_eos=True
            ).text

        async def one(client):
            try:
                done = await client.complete(
                    "The quick brown fox", max_new_tokens=16, temperature=0.0, ignore_eos=True
                )
                return "ok", done.text
            except ResourceExhausted as e:
                assert e.retry_after_s is not None and e.retry_after_s > 0
                return "refused", None

        async def storm():
            clients = [AsyncClient(target) for _ in range(4)]
            try:
                return await asyncio.wait_for(
                    asyncio.gather(*(one(clients[i % 4]) for i in range(200))), timeout=120
                )
            finally:
                for c in clients:
                    await c.close()

        results = asyncio.run(storm())
        admitted = [text for kind, text in results if kind == "ok"]
        refused = [kind for kind, _ in results if kind == "refused"]
        assert len(admitted) + len(refused) == 200
        assert refused and len(admitted) >= 32
        assert all(text == expect for text in admitted)
        assert wait_idle(srv) == 0
        # refused at admission, not after waiting: no refused request ever became an engine sequence (the
        # warm-up, `expect` and the admitted are every sequence that finished)
        engine = srv.runner.engine
        assert engine.finishes == {"length": len(admitted) + 2}
        with Client(target) as c:
            assert c.health() == "SERVING"


@pytest.mark.parametrize("weights", ["q4", "f32"])
def test_batching_changes_no_result(smollm2_folder, weights):
    """8 concurrent requests, greedy and seeded, equal the same requests run alone (in each weight format:
    the quantized kernels compute every token's products the same way whatever the batch holds)."""
    engine = Engine.load(smollm2_folder, weights=weights, kv_cache_tokens=2048)
    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time", "The best way to learn is"]
    requests = [(p, {"temperature": 0.0}) for p in prompts] + [
        (p, {"temperature": 0.9, "top_p": 0.95, "seed": 11 + i}) for i, p in enumerate(prompts)
    ]
    alone = []
    for prompt, kw in requests:
        params = SamplingParams(max_new_tokens=12, ignore_eos=True, **kw)
        alone.append([s.token.token_id for s in engine.generate(prompt, params)])

    with running_server(model=smollm2_folder, weights=weights, kv_cache_tokens=4096) as srv:
        engine = srv.runner.engine
        gate = StepGate(engine)  # no step until all 8 wait: then they run as one batch from the first step

        async def together():
            async with AsyncClient(f"127.0.0.1:{srv.port}") as c:
                calls = [
                    asyncio.ensure_future(c.complete(p, max_new_tokens=12, ignore_eos=True, **kw))
                    for p, kw in requests
                ]
                waiting = lambda: engine.waiting_sequences == len(requests)
                await asyncio.to_thread(wait_until, waiting, "the 8 requests wait for the first step")
                gate.open()
                return await asyncio.gather(*calls)

        try:
            results = asyncio.run(together())
        finally:
            gate.open()
        assert [[t.id for t in r.tokens] for r in results] == alone
        # the warm-up's 2 steps alone, then 12 steps (prefill + 11 decodes) each holding all 8 requests
        assert engine.steps_by_sequences == {1: 2, 8: 12}
        # the metric sees the served steps only, observed after each step returns
        count = "nextword_batch_sequences_count"
        wait_until(lambda: srv.metrics.registry.get_sample_value(count) == 12, "the 12th step is observed")
        assert srv.metrics.registry.get_sample_value("nextword_batch_sequences_sum") == 12 * 8


def test_prefix_cache_serves_a_shared_prefix(smollm2_folder):
    prefix = ("The history of computing is a story of abstraction layered on abstraction. " * 40)[:2900]
    with (
        running_server(model=smollm2_folder, kv_cache_tokens=4096) as srv,
        Client(f"127.0.0.1:{srv.port}") as c,
    ):
        n = len(c.tokenize(prefix).ids)
        assert n >= 480
        first = c.complete(prefix + " First question:", max_new_tokens=2, temperature=0.0)
        second = c.complete(prefix + " Second question:", max_new_tokens=2, temperature=0.0)
        assert first.finish.usage.cached_prompt_tokens == 0
        cached = second.finish.usage.cached_prompt_tokens
        assert n - 16 <= cached <= n  # every full block of the shared prefix
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics").read().decode()
        assert f"nextword_prefix_cache_hit_tokens_total {float(cached)}" in body


def test_session_supersedes_continues_and_reports_errors_in_band(tiny_folder):
    """One Session on a real server, the engine stepped by the test: a request superseded before it ran is
    dropped at the engine's next step; typing what the live generation suggested continues it (no restart:
    its text is the text a single request would have generated); a bad request is an in-band error and the
    session goes on; nothing is left running."""
    prompt, n = "The quick brown", 24
    with running_server(model=tiny_folder, kv_cache_tokens=1024) as srv, Client(f"127.0.0.1:{srv.port}") as c:
        whole = c.complete(prompt + " fox", max_new_tokens=n, temperature=0.0, ignore_eos=True).text
        engine = srv.runner.engine
        gate = StepGate(engine)
        steps_before = engine.steps

        async def session():
            async with AsyncClient(f"127.0.0.1:{srv.port}") as ac:
                s = ac.session()
                items = aiter(s)

                def next_item():  # the next event, or fail (a hang guard)
                    return asyncio.wait_for(anext(items), SAFETY_S)

                kw = {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}

                def reached(live: int, what: str):  # polled off the event loop, which must keep sending
                    waiting = lambda: engine.live_sequences == live and engine.waiting_sequences == 1
                    return asyncio.to_thread(wait_until, waiting, what)

                # One request at a time reaches the engine: a Session keeps only its newest pending request.
                await s.send(prompt + " f", request_id="k1", **kw)
                await reached(1, "k1 reaches the engine")
                await s.send(prompt + " fox", request_id="k2", **kw)
                await reached(2, "k2 reaches the engine; k1, superseded, leaves at the next step")
                await s.send(prompt, request_id="bad", temperature=-1.0)
                error = await next_item()  # the bad request is answered at once, in band
                gate.allow(1)  # one step: k1 is dropped (superseded), k2 runs its prompt and first token
                first = [await next_item(), await next_item()]
                shown = first[1].text
                while len(shown) < 2:  # a step per event until k2 has shown some text
                    gate.allow(1)
                    shown += (await next_item()).text
                typed = shown[:1]
                await s.send(prompt + " fox" + typed, request_id="k3", **kw)  # the user typed the suggestion
                rest = [await next_item(), await next_item()]  # k2 superseded by k3, k3's catch-up text
                gate.open()
                await s.close()
                return error, first, typed, rest, [item async for item in items]

        try:
            error, first, typed, rest, tail = asyncio.run(session())
        finally:
            gate.open()
        assert isinstance(error, SessionError) and error.request_id == "bad"
        assert (error.code_name, error.field) == ("INVALID_ARGUMENT", "sampling.temperature")
        k1_final, k2_first = first
        assert (k1_final.request_id, k1_final.finish.reason, k1_final.token) == ("k1", "superseded", None)
        assert k2_first.request_id == "k2" and k2_first.token is not None
        k2_final, catch_up = rest
        assert (k2_final.request_id, k2_final.finish.reason) == ("k2", "superseded")
        assert catch_up.request_id == "k3" and catch_up.finish is None
        assert all(e.request_id == "k3" for e in tail) and tail[-1].finish.reason == "length"
        assert typed + catch_up.text + "".join(e.text for e in tail) == whole  # continued, not restarted
        assert srv.metrics.registry.get_sample_value("nextword_session_continued_total") == 1
        assert engine.finishes["superseded"] == 1  # k1 only: a continued sequence goes on
        assert engine.steps - steps_before == n  # k2/k3's one sequence: a prompt step + n - 1 decodes
        assert wait_idle(srv) == 0


def test_memory_metrics(tiny_folder):
    """/metrics shows the resident memory next to what the model needs: weights and KV cache in memory."""

    def scrape(port: int) -> dict[str, float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        return {k: float(v) for k, _, v in (line.partition(" ") for line in body.splitlines()) if k[0] != "#"}

    with running_server(model=tiny_folder, kv_cache_tokens=16384) as srv:
        engine = srv.runner.engine
        before = scrape(srv.metrics_port)
        with Client(f"127.0.0.1:{srv.port}") as c, ThreadPoolExecutor(8) as pool:
            prompts = [f"{i} quick brown foxes" for i in range(8)]  # 8 sequences in their own cache blocks
            list(
                pool.map(
                    lambda p: c.complete(p, max_new_tokens=100, temperature=0.0, ignore_eos=True), prompts
                )
            )
        after = scrape(srv.metrics_port)
    # the served q4 weights, counted from the format definitions: 32 weights take 20 bytes in Q4_1 (fp16 d
    # and m, 16 bytes of nibbles), 36 in Q8_M (the LM head: fp16 d and m, 32 uint8); the rest stays float32
    _, tensors = ref.load_reference(tiny_folder)
    q4_1 = sum(x.size for name, x in tensors.items() if name.split(".")[-2] in ref.LLAMA_MATRICES)
    head = tensors["lm_head.weight"].size
    floats = sum(x.size for x in tensors.values()) - q4_1 - head
    assert after["nextword_weights_bytes"] == q4_1 // 32 * 20 + head // 32 * 36 + floats * 4
    kv_before, kv_after = (
        before["nextword_kv_cache_resident_bytes"],
        after["nextword_kv_cache_resident_bytes"],
    )
    assert kv_after >= kv_before + 8 * 100 * engine.cache.bytes_per_token / 2  # the positions written
    assert kv_after < engine.cache.bytes_per_token * 16384 / 4  # reserved for 16384 positions, not resident
    assert after["process_resident_memory_bytes"] > after["nextword_weights_bytes"] + kv_after
    assert after["nextword_kernel_threads"] == srv.runner.kernel_threads.threads >= 1


def test_outbox_delivers_a_step_s_outputs_in_order_in_one_wake_up():
    """Outputs put by the engine thread reach the event loop in order, the ones put before the loop got to
    them in one wake-up; a delivery that fails is reported and the others still arrive."""
    import threading

    from nextword.server.frontend import _Outbox

    loop = asyncio.new_event_loop()
    wakeups, errors, got = [], [], []
    schedule = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: (wakeups.append(1), schedule(*a))
    loop.set_exception_handler(lambda _, context: errors.append(context["exception"]))
    outbox = _Outbox(loop)

    def deliver(x):
        if x == 3:
            raise ValueError("a broken stream")
        got.append(x)

    engine_step = threading.Thread(target=lambda: [outbox.put(deliver, i) for i in range(16)])
    engine_step.start()
    engine_step.join()
    loop.run_until_complete(asyncio.sleep(0))
    assert got == [i for i in range(16) if i != 3]
    assert len(wakeups) == 1 and [str(e) for e in errors] == ["a broken stream"]
    outbox.put(deliver, 16)  # the next step's first output schedules a new delivery
    loop.run_until_complete(asyncio.sleep(0))
    assert got[-1] == 16 and len(wakeups) == 2
    loop.close()
