"""Several replicas, as users run them (docs/deploy.md): three `nextword serve` processes on loopback, reached
through one gRPC target (`ipv4:a:p,b:p,c:p`, what a Kubernetes headless Service gives as `dns:///`) with the
client's default service config, or through nginx (deploy/nginx/nextword.conf). A tiny model: what is tested
is routing, health, retries and reconnection, not the model. The replicas name themselves (r0, r1, r2) in the
x-nextword-replica metadata, so each call shows which one answered.

Destructive tests come last: the Session test kills its replica (then starts it again), the drain-and-kill
test leaves one replica of three.
"""

import asyncio
import os
import shutil
import signal
from collections import Counter

import pytest
from servers import SAFETY_S, ServeProcess, nginx_proxy, wait_until
from tiny_models import write_tiny_model

from nextword.client import AsyncClient, Client, NextwordError, SessionReconnected

LONG = 300  # tokens of a stream that must still be running when its replica is killed


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    model = tmp_path_factory.mktemp("replicas") / "tiny"
    write_tiny_model(model, "llama", context=1024)
    procs = [ServeProcess(model, f"r{i}", "--grace", "60") for i in range(3)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def target(procs) -> str:
    return "ipv4:" + ",".join(p.address for p in procs)


def every_replica_answers(client: Client, names: set[str]) -> None:
    """Calls until each replica has answered one: round_robin spreads over the replicas it has connected to
    and seen SERVING, which takes each a moment after the channel opens."""
    seen: set[str] = set()
    wait_until(
        lambda: seen.add(client.complete("hi", max_new_tokens=1).replica) or seen == names, "all replicas"
    )


def test_round_robin_spreads_unary_calls_evenly(replicas):
    names = {p.name for p in replicas}
    with Client(target(replicas), timeout=SAFETY_S) as c:
        every_replica_answers(c, names)
        counts = Counter(c.complete("The quick brown", max_new_tokens=2).replica for _ in range(60))
    assert set(counts) == names
    assert all(16 <= n <= 24 for n in counts.values()), counts  # 20 each, +-20%


# ---- nginx in front of two replicas ----


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing: .ci/run installs it (apt-get install nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light); CI installs it")
    return found


@pytest.fixture
def nginx(replicas, tmp_path):
    with nginx_proxy(nginx_binary(), [p.address for p in replicas[:2]], tmp_path) as address:
        yield address


def test_nginx_proxies_streams_and_sessions_to_both_replicas(replicas, nginx):
    two = {p.name for p in replicas[:2]}
    with Client(nginx, timeout=SAFETY_S) as proxied, Client(replicas[0].address, timeout=SAFETY_S) as direct:
        streams = [
            list(proxied.generate("Once upon a time", max_new_tokens=12, ignore_eos=True, temperature=0))
            for _ in range(8)
        ]
        reference = "".join(
            e.text
            for e in direct.generate("Once upon a time", max_new_tokens=12, ignore_eos=True, temperature=0)
        )
        with proxied.session() as s:
            ids = [s.send(f"def f{i}(x):", max_new_tokens=8, ignore_eos=True) for i in range(3)]
            s.close()
            items = list(s)
    for events in streams:  # every stream whole, from one replica, the same bytes as a direct call
        assert events[-1].finish.reason == "length" and sum(e.token is not None for e in events) == 12
        assert len({e.replica for e in events}) == 1
        assert "".join(e.text for e in events) == reference
    assert {events[0].replica for events in streams} == two  # nginx balanced the calls over both
    finals = {e.request_id: e.finish.reason for e in items if e.finish is not None}
    assert set(finals) == set(ids) and finals[ids[-1]] == "length"  # the latest answered, the rest superseded
    assert len({e.replica for e in items}) == 1 and items[0].replica in two  # a Session stays on its replica


# ---- replicas going away (destructive: these run last) ----


def test_session_resumes_on_another_replica_when_its_replica_is_killed(replicas):
    with Client(target(replicas), timeout=SAFETY_S) as c:
        every_replica_answers(c, {p.name for p in replicas})
        with c.session() as s:
            first = s.send("Once upon", max_new_tokens=4, ignore_eos=True)
            home = next(e for e in s if e.request_id == first and e.finish is not None).replica
            victim = next(p for p in replicas if p.name == home)
            latest = s.send("The quick brown fox", max_new_tokens=LONG, ignore_eos=True, temperature=0)
            next(e for e in s if e.request_id == latest and e.token is not None)  # generating on `home`
            victim.signal(signal.SIGKILL)
            items = []
            for item in s:
                items.append(item)
                if getattr(item, "finish", None) is not None and item.request_id == latest:
                    break
            s.close()
    victim.stop()
    victim.start()  # for the tests after this one
    victim.wait_ready()
    reconnects = [i for i, item in enumerate(items) if isinstance(item, SessionReconnected)]
    assert len(reconnects) == 1, items
    told = items[reconnects[0]]
    assert (told.previous_replica, told.cause, told.resent) == (home, "UNAVAILABLE", latest)
    again = items[reconnects[0] + 1 :]  # the latest request, from its start, on another replica
    assert {e.replica for e in again} == {again[0].replica} and again[0].replica != home
    assert sum(e.token is not None for e in again) == LONG and again[-1].finish.reason == "length"


def test_drain_and_kill_during_load(replicas):
    """A closed loop of unary calls and streams over 3 replicas; one is drained (SIGTERM), then one is killed
    (SIGKILL) while streams run on it. Every unary call succeeds (the retry policy sends a call that found a
    replica gone to another one, and the client sends again one cut off by the kill); the streams that were
    running on the killed replica end UNAVAILABLE; nothing else fails."""
    drained, killed, survivor = replicas

    async def scenario():
        unary: list[tuple[str, str]] = []  # (outcome, replica)
        streams: list[dict] = []
        stop = asyncio.Event()
        async with AsyncClient(target(replicas), timeout=SAFETY_S) as c:

            async def unary_worker():
                while not stop.is_set():
                    try:
                        r = await c.complete("The quick brown", max_new_tokens=8, ignore_eos=True)
                        unary.append(("OK", r.replica))
                    except NextwordError as e:
                        unary.append((e.code_name, ""))

            async def stream_worker():
                while not stop.is_set():
                    rec = {"replica": "", "end": None, "events": 0}
                    streams.append(rec)
                    try:
                        async for e in c.generate("Once upon a time", max_new_tokens=64, ignore_eos=True):
                            rec["replica"] = e.replica
                            rec["events"] += 1
                        rec["end"] = "OK"
                    except NextwordError as e:
                        rec["end"] = e.code_name

            async def until(condition, what: str):
                for _ in range(int(SAFETY_S / 0.01)):
                    if condition():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"never happened: {what}")

            workers = [asyncio.create_task(w()) for w in [unary_worker] * 3 + [stream_worker] * 3]
            try:
                names = {p.name for p in replicas}
                await until(lambda: {r for _, r in unary} == names, "every replica answered a call")
                drained.signal(signal.SIGTERM)
                await until(lambda: not drained.alive, "the drained replica exited")
                while True:  # freeze the victim with streams in flight on it, then kill it
                    killed.signal(signal.SIGSTOP)
                    # early in their 64 tokens: a stream read to its last tokens may have been sent whole
                    if any(
                        r["replica"] == killed.name and r["end"] is None and r["events"] < 16 for r in streams
                    ):
                        break
                    killed.signal(signal.SIGCONT)
                    await asyncio.sleep(0.01)
                killed.signal(signal.SIGKILL)
                at_kill = (len(unary), len(streams))
                await until(
                    lambda: len(unary) >= at_kill[0] + 12 and len(streams) >= at_kill[1] + 6,
                    "calls went on after the kill",
                )
            finally:
                stop.set()
                await asyncio.gather(*workers)
        return unary, streams

    unary, streams = asyncio.run(scenario())
    assert drained.proc.returncode == 0  # the drain finished its streams within the grace period and exited
    assert {outcome for outcome, _ in unary} == {"OK"}
    failed = [r for r in streams if r["end"] != "OK"]
    assert failed and all((r["replica"], r["end"]) == (killed.name, "UNAVAILABLE") for r in failed), failed
    assert {r["replica"] for r in streams[-6:]} == {survivor.name}
