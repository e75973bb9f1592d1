"""Every tensor of a folder's `*.safetensors` files, by name, as C-contiguous float32 NumPy arrays.

A generic helper for small models that need no name table or config checks (the pixels example).
Language models go through `loader.load_checkpoint`, which validates names and shapes against config.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from nextword.weights.loader import read_bf16


def load_tensors(folder: str | Path) -> dict[str, np.ndarray]:
    """Read all `*.safetensors` in `folder` (sorted by file name). Raises ValueError on a missing folder or
    file, an unreadable file, or a tensor name stored twice."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if name in tensors:
                        raise ValueError(f"{path}: tensor {name!r} is also stored in another file")
                    s = f.get_slice(name)
                    if s.get_dtype() == "BF16":  # numpy has no bfloat16: widen the raw bits
                        tensors[name] = read_bf16(path, name, tuple(s.get_shape()))
                    else:
                        tensors[name] = np.ascontiguousarray(f.get_tensor(name), dtype=np.float32)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors
