"""Which instruction set the kernels are compiled for, and how to compile them for another one.

Numba compiles for the host CPU unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise (read once, when
numba is imported). So a process can run the code another CPU would run: `numba_env("avx2")` is the
environment of a process compiling for an AVX2-only CPU (AMD Zen 3: AVX2, FMA, F16C, no AVX-512) even on
an AVX-512 host; `numba_env("portable")` that of a CPU without AVX2 (x86-64-v2: SSE4.2), where the
explicit-SIMD kernels give way to the portable ones. Each gets its own Numba cache directory, so kernels
compiled for different CPUs never share a cache.

`target()` reports what this process compiles for, from the code LLVM actually emits for Numba's target
(name and features as Numba resolves them): that is what the AVX2 `@intrinsic`s need, and what tables and
the server's start line print.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

ISAS = ("native", "avx2", "portable")
# LLVM CPU names; an empty feature list means exactly that CPU's own features (none of the host's).
_CPUS = {"avx2": "znver3", "portable": "x86-64-v2"}
CACHE_ROOT = Path.home() / ".cache" / "nextword"


def numba_env(isa: str, cache_root: Path = CACHE_ROOT) -> dict[str, str]:
    """Environment variables that make a new process compile its kernels for `isa` (native: the host)."""
    if isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}; choose one of {', '.join(ISAS)}")
    if isa == "native":
        return {}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise ValueError(f"--isa {isa} emulates an x86-64 CPU; this host is {platform.machine()}")
    return {
        "NUMBA_CPU_NAME": _CPUS[isa],
        "NUMBA_CPU_FEATURES": "",
        "NUMBA_CACHE_DIR": str(cache_root / f"numba-{isa}"),
    }


def with_isa(env: dict[str, str], isa: str) -> dict[str, str]:
    """`env` with the NUMBA_CPU_* / NUMBA_CACHE_DIR settings of `isa` (those of the host removed for native)."""
    out = {
        k: v for k, v in env.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_CACHE_DIR")
    }
    return out | numba_env(isa)


@dataclass(frozen=True)
class Target:
    cpu: str  # the LLVM CPU name Numba compiles for
    avx2: bool  # AVX2 + FMA + F16C: the explicit-SIMD kernels can run
    avx512: bool  # LLVM may use AVX-512 (zmm registers) in the plain Numba kernels

    @property
    def isa(self) -> str:
        """avx512, avx2 or baseline: the widest vector instructions in the compiled code."""
        return "avx512" if self.avx512 else "avx2" if self.avx2 else "baseline"

    @property
    def kernels(self) -> str:
        """The quantized matmul kernels in use: avx2 (explicit SIMD) or portable (plain Numba)."""
        return "avx2" if self.avx2 else "portable"

    def __str__(self) -> str:
        return f"{self.isa} (LLVM cpu {self.cpu}, {self.kernels} kernels)"


# One function per feature of interest, in target-independent IR; what LLVM selects for it tells whether
# the target has the feature (a target intrinsic such as llvm.x86.avx2.* would abort LLVM instead).
_PROBE = """
define void @probe(ptr %a, ptr %f, ptr %h, ptr %o, ptr %w) #0 {
  %x = load <32 x i8>, ptr %a
  %y = add <32 x i8> %x, %x
  store <32 x i8> %y, ptr %a
  %v = load <8 x float>, ptr %f
  %p = call <8 x float> @llvm.fma.v8f32(<8 x float> %v, <8 x float> %v, <8 x float> %v)
  store <8 x float> %p, ptr %f
  %hh = load <8 x half>, ptr %h
  %e = fpext <8 x half> %hh to <8 x float>
  store <8 x float> %e, ptr %o
  %wv = load <16 x float>, ptr %w
  %ww = fadd <16 x float> %wv, %wv
  store <16 x float> %ww, ptr %w
  ret void
}
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
attributes #0 = { "min-legal-vector-width"="512" }
"""


@functools.cache
def target() -> Target:
    """What Numba compiles for in this process (honours NUMBA_CPU_NAME and NUMBA_CPU_FEATURES)."""
    import llvmlite.binding as ll
    from numba.core import config

    name = config.CPU_NAME or ll.get_host_cpu_name()
    if config.CPU_FEATURES is not None:
        features = config.CPU_FEATURES
    else:
        features = ll.get_host_cpu_features().flatten()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return Target(cpu=name, avx2=False, avx512=False)
    ll.initialize_native_target()
    ll.initialize_native_asmprinter()
    tm = ll.Target.from_default_triple().create_target_machine(cpu=name, features=features, opt=2)
    asm = tm.emit_assembly(ll.parse_assembly(_PROBE))
    avx2 = "vpaddb\t%ymm" in asm and "vfmadd" in asm and "vcvtph2ps" in asm
    return Target(cpu=name, avx2=avx2, avx512="%zmm" in asm)


def uses_avx512(asm: str) -> bool:
    """Whether compiled code (a kernel's `inspect_asm()`) uses AVX-512 registers."""
    return "%zmm" in asm or "%k1" in asm


def reexec_as(isa: str) -> None:
    """Restart this script (same arguments) compiling for `isa`, unless it already does (for --isa options)."""
    env = with_isa(dict(os.environ), isa)
    if env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":  # env $(python -m nextword.kernels.isa portable) nextword serve ...
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m nextword.kernels.isa {{{','.join(ISAS)}}}   (prints NAME=value settings)")
    print(" ".join(f"{k}={v}" for k, v in numba_env(sys.argv[1]).items()))
