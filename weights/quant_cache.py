"""Quantized weights written once to the model folder and mapped at every later start.

Quantizing SmolLM2-135M's float32 weights to q4 takes ~2 s at each start; the result depends only on the
float32 files, the format and the quantizer. So the first load in a format writes its blocks to
`<model>/nextword-quantized/<format>-v<QUANTIZER_VERSION>.safetensors` (a folder of its own: the model's
`*.safetensors` stay the only ones at its top), and later loads map that file instead: no float32 matrix
is read, nothing is quantized, and the pages are the OS's page cache (shared, reclaimable) rather than
process memory. The file records the size and modification time of the float32 files it was made from;
when they change, or the quantizer's version does, it is rewritten. A folder that cannot be written
(read-only) just quantizes at each start.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from nextword.weights.quantize import (
    QUANTIZER_VERSION,
    Q4Weight,
    Q8MWeight,
    Q8Weight,
    quantize_head,
    quantize_matrix,
)

_DTYPES = {"I8": np.int8, "U8": np.uint8, "U16": np.uint16, "F32": np.float32}
_FIELDS = {Q8Weight: ("qs", "d"), Q4Weight: ("qs", "d", "m"), Q8MWeight: ("qs", "d", "m")}


def cache_path(folder: Path, fmt: str) -> Path:
    return folder / "nextword-quantized" / f"{fmt}-v{QUANTIZER_VERSION}.safetensors"


def _source_stamp(sources: list[Path]) -> str:
    return json.dumps({p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(sources)})


def _weight_type(fields: dict[str, np.ndarray]) -> type:
    """Which format stored blocks are: Q8_0 has no `m`; Q4_1 packs 2 values a byte, Q8_M one."""
    if "m" not in fields:
        return Q8Weight
    return Q8MWeight if fields["qs"].shape[1] == fields["d"].shape[1] * 32 else Q4Weight


class QuantizedMatrices:
    """Where a load gets its matmul weights in format `fmt`: `get(key, read)` returns the cached blocks of
    `key` when the cache file is valid, else quantizes `read()` (and remembers it for `save`)."""

    def __init__(self, folder: Path, fmt: str, sources: list[Path]):
        self.fmt, self.path = fmt, cache_path(folder, fmt)
        self.stamp = _source_stamp(sources)
        self.cached: dict[str, np.ndarray] = {} if fmt == "f32" else self._map()
        self.new: dict[str, Q8Weight | Q4Weight | Q8MWeight] = {}

    @property
    def hit(self) -> bool:
        return bool(self.cached)

    def get(self, key: str, read: Callable[[], np.ndarray], head: bool = False):
        if self.fmt == "f32":
            return read()
        if f"{key}.qs" in self.cached:
            fields = {f: self.cached[f"{key}.{f}"] for f in ("qs", "d", "m") if f"{key}.{f}" in self.cached}
            return _weight_type(fields)(**fields)
        if key in self.cached:  # stored float32 (K not a multiple of the block size)
            return self.cached[key]
        w = quantize_head(read(), self.fmt) if head else quantize_matrix(read(), self.fmt)
        self.new[key] = w
        return w

    def save(self) -> None:
        """Write what this load quantized (when nothing came from the cache). Never fails the load."""
        if self.fmt == "f32" or self.hit or not self.new:
            return
        tensors = {}
        for key, w in self.new.items():
            if isinstance(w, np.ndarray):
                tensors[key] = np.ascontiguousarray(w, dtype=np.float32)
            else:
                tensors |= {f"{key}.{f}": getattr(w, f) for f in _FIELDS[type(w)]}
        meta = {"format": self.fmt, "quantizer_version": str(QUANTIZER_VERSION), "sources": self.stamp}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            tmp.chmod(0o644)  # a shared model cache: readable by every user of it
            os.replace(tmp, self.path)  # atomic: a concurrent start sees the old state or the whole file
        except (OSError, SafetensorError):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _map(self) -> dict[str, np.ndarray]:
        """The cache file's tensors as arrays over a private mapping of it, or {} if it is absent or stale."""
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable arrays, never written
        except (OSError, ValueError, struct.error):
            return {}
        meta = header.pop("__metadata__", {})
        if meta.get("sources") != self.stamp or meta.get("quantizer_version") != str(QUANTIZER_VERSION):
            return {}
        arrays = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            if (8 + n + start) % dtype.itemsize:
                return {}
            count = (end - start) // dtype.itemsize
            arrays[name] = np.frombuffer(mapping, dtype, count, 8 + n + start).reshape(info["shape"])
        return arrays
