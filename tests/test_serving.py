"""Serving many at once: batching changes no result, admission control, prefix cache, editor sessions, metrics."""

import asyncio
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from servers import running_server, wait_idle
from tiny_models import write_tiny_model

from nextword.client import AsyncClient, Client, ResourceExhausted
from nextword.server.engine import Engine
from nextword.server.sampling import SamplingParams

LINE = (
    "The old clockmaker opened his shop every morning at seven, wound the great brass clock above the door, "
    "and sat down at his bench to repair the watches that the village had brought him the day before."
)[:200]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_serving")
    write_tiny_model(folder, "llama", seed=7)
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
            started = time.perf_counter()
            try:
                done = await client.complete(
                    "The quick brown fox", max_new_tokens=16, temperature=0.0, ignore_eos=True
                )
                return "ok", done.text, time.perf_counter() - started
            except ResourceExhausted as e:
                assert e.retry_after_s is not None and e.retry_after_s > 0
                return "refused", None, time.perf_counter() - started

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
        admitted = [text for kind, text, _ in results if kind == "ok"]
        refused = [s for kind, _, s in results if kind == "refused"]
        assert len(admitted) + len(refused) == 200
        assert refused and len(admitted) >= 32
        assert all(text == expect for text in admitted)
        assert max(refused) < 5.0  # refused at admission, not after waiting
        assert wait_idle(srv) == 0
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

        async def together():
            async with AsyncClient(f"127.0.0.1:{srv.port}") as c:
                calls = [c.complete(p, max_new_tokens=12, ignore_eos=True, **kw) for p, kw in requests]
                return await asyncio.gather(*calls)

        results = asyncio.run(together())
        assert [[t.id for t in r.tokens] for r in results] == alone
        assert max(srv.metrics.batch_sequences.collect()[0].samples, key=lambda s: s.value)  # recorded


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


def test_autocomplete_typist_session(smollm2_folder):
    """A scripted typist, one keystroke every 50 ms over a 200-character line, through one Session: every
    keystroke is answered or superseded, a superseded generation is dropped at the engine's next step, and
    nothing is left running."""
    with running_server(model=smollm2_folder, kv_cache_tokens=8192) as srv:
        engine = srv.runner.engine
        cancelled_at, finished_at = {}, {}  # request id -> engine step count
        cancel, finish_ = engine.cancel, engine._finish

        def record_cancel(seq, reason="cancelled"):
            cancelled_at.setdefault(seq.id, engine.steps)
            cancel(seq, reason)

        def record_finish(seq, *args, **kwargs):
            finished_at[seq.id] = engine.steps
            finish_(seq, *args, **kwargs)

        engine.cancel, engine._finish = record_cancel, record_finish

        async def type_line():
            async with AsyncClient(f"127.0.0.1:{srv.port}") as c:
                session = c.session()
                finish: dict[str, object] = {}
                order = []

                async def read():
                    async for item in session:
                        if hasattr(item, "code_name"):
                            raise AssertionError(f"in-band error: {item}")
                        if item.finish:
                            finish[item.request_id] = item.finish

                reader = asyncio.create_task(read())
                for i in range(1, len(LINE) + 1):
                    rid = await session.send(
                        LINE[:i], max_new_tokens=16, max_lines=1, temperature=0.0, request_id=f"k{i}"
                    )
                    order.append(rid)
                    await asyncio.sleep(0.05)
                await session.close()
                await reader
                return order, finish

        order, finish = asyncio.run(type_line())
        assert set(finish) == set(order)  # every keystroke got a final event
        reasons = [finish[r].reason for r in order]
        assert reasons[-1] != "superseded"
        assert set(reasons) <= {"superseded", "length", "lines", "eos"}
        assert reasons.count("superseded") < len(order)  # some keystrokes were answered in full
        superseded = [r for r in cancelled_at if finish[r].reason == "superseded"]
        assert superseded
        assert max(finished_at[r] - cancelled_at[r] for r in superseded) <= 1  # dropped at the next step
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
    assert after["nextword_weights_bytes"] == engine.model.checkpoint.nbytes
    kv_before, kv_after = (
        before["nextword_kv_cache_resident_bytes"],
        after["nextword_kv_cache_resident_bytes"],
    )
    assert kv_after >= kv_before + 8 * 100 * engine.cache.bytes_per_token / 2  # the positions written
    assert kv_after < engine.cache.bytes_per_token * 16384 / 4  # reserved for 16384 positions, not resident
    assert after["process_resident_memory_bytes"] > after["nextword_weights_bytes"] + kv_after
