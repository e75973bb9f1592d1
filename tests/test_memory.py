"""What keeps a server's memory small (benchmarks/README.md, "Memory of the server"): each reduction that a
later change could undo without any other test noticing."""

import json
import subprocess
import sys

import numpy as np
import pytest

from nextword.kernels.elementwise import add
from nextword.kernels.matmul import matmul_f32
from nextword.server.tokenizer import Tokenizer

# A fresh process (its modules are what is checked): a server's imports; then two kernels loaded from Numba's
# cache (one parallel: OpenMP); then a function compiled from scratch, which needs the registries a cache
# load skips.
PROBE = """
import json, sys
import numpy as np
import nextword.server.cli, nextword.server.serve, nextword.weights.default_model
report = {"imported": sorted({"gguf", "nextword.kernels.inspect"} & set(sys.modules))}
if sys.argv[1] == "lean":
    from nextword.kernels.cache_loading import lean_cache_loads
    lean_cache_loads()
from numba import njit
from nextword.kernels.elementwise import add
from nextword.kernels.matmul import matmul_f32
x, y = np.arange(12, dtype=np.float32).reshape(3, 4), np.full((3, 4), 0.5, np.float32)
add(x, y)
out = np.zeros((3, 3), np.float32)
matmul_f32(out, x, x)
hits = sum(add.stats.cache_hits.values()) + sum(matmul_f32.stats.cache_hits.values())
report |= {"sum": x.tolist(), "matmul": out.tolist(), "cache_hits": hits}
report["registries"] = "numba.np.arraymath" in sys.modules

@njit
def total(a):
    return a.sum()

report["total"] = float(total(x))
print(json.dumps(report))
"""


def probe(mode: str) -> dict:
    x = np.zeros((3, 4), np.float32)
    add(x, x)  # compiled (and cached) for these signatures, if no earlier run did it
    matmul_f32(np.zeros((3, 3), np.float32), x, x)
    cmd = [sys.executable, "-c", PROBE, mode]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def lean():
    return probe("lean")


def test_a_server_imports_neither_gguf_nor_the_inspection_kernels(lean):
    """gguf (only a first start imports the model) and nextword.kernels.inspect (only inspection RPCs use
    it) are imported when first needed."""
    assert lean["imported"] == []


def test_cached_kernels_load_without_the_compiler_registries(lean):
    expected = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.5
    assert lean["cache_hits"] == 2  # loaded, not compiled
    assert lean["sum"] == expected.tolist()
    np.testing.assert_allclose(lean["matmul"], expected @ expected.T, rtol=1e-6)
    assert not lean["registries"]
    assert lean["total"] == float(expected.sum())  # compiling still works: it loads the registries itself
    assert probe("numba")["registries"]  # what Numba's own cache load imports


def test_both_tokenizers_share_one_bpe_model(tiny_folder):
    """The tokenizer that keeps special-token strings as text (chat contents) is the main one but for its
    added tokens: one BPE model (vocabulary, merges) serves both."""
    tok = Tokenizer(tiny_folder)
    tok._tok.model.dropout = 0.25  # a setting of the model: seen through both
    assert tok._text_tok.model.dropout == 0.25
