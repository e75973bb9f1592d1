"""Loading cached kernels without Numba's compiler registries: 11 MiB less for the server.

Before it loads a kernel from its on-disk cache, Numba "refreshes" its CPU target: it imports and registers
every implementation its compiler knows (numpy's linear algebra and random generators, typed dicts, lists
and sets, unicode strings, cffi, jitclasses... ~90 modules), although a cached kernel is machine code that
needs none of them: only the Numba runtime (NRT) it calls into. In a q4 server that was 11 MiB of the 21 MiB
its kernels took to load. `lean_cache_loads()` makes a cache load initialize just the runtime; compiling
(a cache miss, a new signature) still refreshes the whole target first (numba.core.compiler.CompilerBase),
so nothing that compiles sees a difference.
"""

from __future__ import annotations

from numba.core.caching import FunctionCache
from numba.core.runtime import rtsys


def lean_cache_loads() -> None:
    """Process-wide: cache loads initialize only the Numba runtime. Call before the first kernel runs. A Numba
    whose cache lacks the private methods this relies on keeps its own loading (tests/test_memory.py fails)."""
    if all(hasattr(FunctionCache, name) for name in ("_guard_against_spurious_io_errors", "_load_overload")):
        FunctionCache.load_overload = _load_without_refresh


def _load_without_refresh(self: FunctionCache, sig, target_context):
    # numba.core.caching.Cache.load_overload, without target_context.refresh()
    rtsys.initialize(target_context)  # the NRT functions cached kernels link against
    with self._guard_against_spurious_io_errors():
        return self._load_overload(sig, target_context)
