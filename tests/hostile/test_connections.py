"""Item 11 of issue 10: idle connections cost no thread each and do not stay open forever."""

import socket
import threading
import urllib.request

import pytest
from servers import running_server


@pytest.fixture(scope="module")
def server(tiny_folder):
    with running_server(model=tiny_folder, weights="f32", kv_cache_tokens=4096, handshake_timeout_s=1) as srv:
        yield srv


def test_idle_metrics_connections_make_no_threads_and_are_closed(server):
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.metrics_port)) for _ in range(100)]
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=60).read()
        assert b"nextword_generated_tokens" in body
        assert threading.active_count() <= threads + 2  # not one per connection
        idle[0].settimeout(60)
        assert idle[0].recv(1) == b""  # closed by the server (idle past its timeout, or over the cap)
    finally:
        for s in idle:
            s.close()


def test_a_grpc_connection_without_a_preface_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(60)
        try:
            data = s.recv(4096)  # the server's settings frame may come first; then the close
            while data:
                data = s.recv(4096)
        except ConnectionResetError:
            pass
