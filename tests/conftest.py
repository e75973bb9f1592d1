"""Shared fixtures. tests/ is put on sys.path so the oracle modules (reference, tiny_models) import plainly."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The default model, fetched and imported once into the cache ($NEXTWORD_HOME or ~/.cache/nextword)."""
    from nextword.weights.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Llama model folder (random weights, a small tokenizer), for tests of the server, not the model."""
    from tiny_models import write_tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_model(folder, "llama")
    return folder


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    """One engine on the real model for the whole run (kernels compile once)."""
    from nextword.server.engine import Engine

    return Engine.load(smollm2_folder, kv_cache_tokens=4096)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_folder):
    """`nextword serve` as users run it (default weights) on a free port, in-process: an event loop on a
    background thread, with the OpenAI-compatible HTTP API on a free port too. Shared by the inspection, docs
    and HTTP tests."""
    from servers import running_server

    with running_server(model=smollm2_folder, kv_cache_tokens=4096, http_port=0) as srv:
        yield srv
