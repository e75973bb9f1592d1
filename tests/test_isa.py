"""The kernels another CPU would run, compiled and checked here: the AVX2 path on any x86 host (AVX-512
ones included) and the portable path (a CPU without AVX2), each in its own process (Numba reads the target
CPU once, at import) against the float64 reference. See nextword.kernels.isa and tests/isa_kernels.py."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from nextword.kernels import isa

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_native_target_is_what_numba_compiles_for():
    t = isa.target()
    if X86:
        assert t.cpu  # a real LLVM name, and the AVX2 kernels run exactly when the target has AVX2
    from nextword.kernels import quant

    assert quant.HAVE_AVX2 == t.avx2
    assert (quant._dot_q8 is quant._dot_q8_avx2) == t.avx2
    assert (quant._dot_q8_x4 is quant._dot_q8_avx2_x4) == t.avx2
    assert (quant.matmul_q4_1_xq is quant._matmul_q4_1_xq_rows) == t.avx2
    assert (quant.matmul_q8_m_xq is quant._matmul_q8_m_xq_rows) == t.avx2


@pytest.mark.skipif(not X86, reason="AVX2 and x86-64-v2 targets exist only on x86-64 hosts")
@pytest.mark.parametrize("which", ["avx2", "portable"])
def test_kernels_compiled_for_another_cpu_match_reference(which, tmp_path):
    env = isa.with_isa(dict(os.environ), which)
    assert env["NUMBA_CPU_FEATURES"] == ""  # the named CPU's own features, none of this host's
    script = Path(__file__).parent / "isa_kernels.py"
    r = subprocess.run(
        [sys.executable, str(script), which],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"ok: {'avx2' if which == 'avx2' else 'baseline'} (LLVM cpu " in r.stdout


def test_numba_env_rejects_unknown_isa():
    with pytest.raises(ValueError, match="unknown instruction set 'avx3'"):
        isa.numba_env("avx3")
    assert isa.numba_env("native") == {}


@pytest.mark.skipif(not X86, reason="AVX2 and x86-64-v2 targets exist only on x86-64 hosts")
def test_command_prints_the_settings_for_env():
    """`env $(python -m nextword.kernels.isa portable) nextword serve` runs a server on the portable kernels."""
    out = subprocess.run([sys.executable, "-m", "nextword.kernels.isa", "portable"], check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    assert dict(kv.split("=", 1) for kv in out) == isa.numba_env("portable")
