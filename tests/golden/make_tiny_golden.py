"""Write tests/golden/tiny_logits.json: Hugging Face transformers logits of the tiny random models.

Needs torch + transformers, which the nextword venv does not have, so it runs with another interpreter:

    ~/.cache/nextword-peers/venv/bin/python tests/golden/make_tiny_golden.py

For every entry of GOLDEN it writes the folder with tests/tiny_models.py (imported by path), loads it with
AutoModelForCausalLM (float32, eager attention), checks that no tensor was missing or unused, and stores
the last 3 positions' logits (6 significant digits) together with the sha256 of the weight files, so that
tests/test_reference.py can tell "the writer changed" apart from "the reference is wrong".
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny_logits.json"
TOKEN_IDS = [1, 17, 299, 42, 256, 3, 150, 77, 0, 201, 2]  # includes the first and the last vocab rows
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 100,  # bands: wavelen < 25 kept, > 100 divided, between smoothed
}
GOLDEN = {  # name -> write_tiny_model keyword arguments
    "llama": {"kind": "llama"},
    "llama_tied": {"kind": "llama_tied"},
    "qwen2": {"kind": "qwen2"},
    "mistral": {"kind": "mistral", "seed": 1},
    "gpt2": {"kind": "gpt2"},
    "llama_bf16_sharded": {"kind": "llama", "dtype": "bfloat16", "shards": 2},
    "qwen2_f16": {"kind": "qwen2", "dtype": "float16"},
    "llama_rope_llama3": {"kind": "llama", "rope_scaling": LLAMA3},
    "llama_rope_linear": {"kind": "llama", "rope_scaling": {"type": "linear", "factor": 4.0}},
}


def _import(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def hf_logits(folder: Path, config: dict) -> np.ndarray:
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched keys, errors
    assert not bad, f"{folder.name}: loading problems {bad}"
    if config["model_type"] != "gpt2":  # the config reached the model as written
        rope = model.config.rope_parameters
        assert rope["rope_theta"] == config["rope_theta"], rope
        scaling = config.get("rope_scaling") or {}
        assert rope["rope_type"] == scaling.get("rope_type", scaling.get("type", "default")), rope
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([TOKEN_IDS]), use_cache=False).logits[0]  # [T, vocab]
    return out.double().numpy()


def to_json(golden: dict) -> str:
    """Plain JSON, laid out for readable diffs: one line per field, one line per logits row."""
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in golden.items() if k != "models"]
    lines.append('  "models": {')
    for i, (name, m) in enumerate(golden["models"].items()):
        lines.append(f"    {json.dumps(name)}: {{")
        lines += [f"      {json.dumps(k)}: {json.dumps(v)}," for k, v in m.items() if k != "logits_last3"]
        rows = ",\n".join(f"        {json.dumps(row)}" for row in m["logits_last3"])
        lines.append(f'      "logits_last3": [\n{rows}\n      ]')
        lines.append("    }" + ("," if i < len(golden["models"]) - 1 else ""))
    return "\n".join(lines + ["  }", "}", ""])


def main() -> None:
    tiny, reference = _import("tiny_models"), _import("reference")
    models, worst = {}, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in GOLDEN.items():
            folder = Path(tmp) / name
            config = tiny.write_tiny_model(folder, **kwargs)
            logits = hf_logits(folder, config)
            diff = np.abs(reference.reference_logits(folder, TOKEN_IDS) - logits).max()
            worst = max(worst, diff)
            print(f"{name:20s} hf logit std {logits.std(-1).mean():.2f}  |reference - hf| max {diff:.2e}")
            models[name] = {
                "write_tiny_model": {
                    "seed": 0,
                    "dtype": "float32",
                    "shards": 1,
                    "rope_scaling": None,
                    **kwargs,
                },
                "weights_sha256": weights_sha256(folder),
                "token_ids": TOKEN_IDS,
                "logits_last3": [[float(f"{v:.6g}") for v in row] for row in logits[-3:]],
            }
    golden = {
        "made_by": "tests/golden/make_tiny_golden.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "max_abs_diff_reference_vs_hf": float(f"{worst:.3g}"),
        "models": models,
    }
    text = to_json(golden)
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text)} bytes), max |reference - hf| {worst:.2e}")


if __name__ == "__main__":
    main()
