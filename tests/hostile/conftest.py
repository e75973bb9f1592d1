"""Hostile clients against a real in-process server: one tiny-model server shared by the module's tests
(the behaviours tested are the server's, not the model's), raw stubs so a test sends exactly the bytes it means."""

import grpc
import pytest
from servers import running_server

from nextword.v1 import nextword_pb2_grpc


@pytest.fixture(scope="module")
def tiny_server(tiny_folder):
    with running_server(model=tiny_folder, weights="f32", kv_cache_tokens=4096) as srv:
        yield srv


@pytest.fixture
def channel(tiny_server):
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return nextword_pb2_grpc.InferenceStub(channel)
