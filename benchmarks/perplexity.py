"""Quality of the weight formats: perplexity on a fixed English text, and next-token agreement with float32.

    python benchmarks/perplexity.py [--model PATH] [--formats f32 int8 q4] [--window 1024] [--kv f32 f16]

The text is benchmarks/data/english.txt (4,095 SmolLM2 tokens: prose paragraphs of the Python Language
Reference, from CPython's pydoc_data, PSF license). It is cut into windows of `--window` tokens with no
overlap; each window is one prefill that returns the logits of every position (the first token of each
window is not predicted). Perplexity = exp(mean negative log-likelihood of the predicted tokens). Top-1
agreement: the fraction of positions whose most likely next token equals float32's (f32 weights, f32 KV
cache). `--kv f32 f16` scores each format with each KV-cache dtype (the server's default: f16 with quantized
weights, f32 with f32 weights).
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np

from nextword.kernels.isa import ISAS, reexec_as, target
from nextword.kernels.model import KV_DTYPES, Batch, Model
from nextword.kernels.softmax import log_softmax
from nextword.server.tokenizer import Tokenizer
from nextword.weights.default_model import ensure_default_model
from nextword.weights.loader import load_checkpoint
from nextword.weights.quantize import quantize_checkpoint

TEXT = Path(__file__).parent / "data" / "english.txt"


def score(
    model: Model, ids: list[int], window: int, decode_path: bool, kv: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted position: (negative log-likelihood of the actual next token, argmax token). With
    `decode_path`, every position goes through the matmul path of decode tokens (integer activations for
    the quantized formats) instead of the prompt path (float32 activations)."""
    block = 16
    cache = model.new_cache(num_blocks=-(-window // block), block_size=block, dtype=kv)
    nll, top1 = [], []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        blocks = list(range(-(-len(chunk) // block)))
        batch = Batch.build(
            [(chunk, 0, blocks, "all")], block, decode_tokens=len(chunk) if decode_path else 0
        )
        logits = model.forward(cache, batch)  # [T, V]
        logprobs = np.empty_like(logits)
        log_softmax(logprobs, logits)
        targets = np.asarray(chunk[1:])
        nll.append(-logprobs[np.arange(len(targets)), targets].astype(np.float64))
        top1.append(logits[:-1].argmax(-1))
    return np.concatenate(nll), np.concatenate(top1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF model folder (default: the default model)")
    ap.add_argument("--formats", nargs="+", default=["f32", "int8", "q4"])
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--kv", nargs="+", choices=KV_DTYPES, default=["f32"], help="KV-cache dtypes to score")
    ap.add_argument(
        "--isa", choices=ISAS, help="compile the kernels for this instruction set (default: host)"
    )
    args = ap.parse_args()
    if args.isa:
        reexec_as(args.isa)

    folder = Path(args.model) if args.model else ensure_default_model(progress=None)
    ids = Tokenizer(folder).encode(TEXT.read_text())
    checkpoint = load_checkpoint(folder)
    results = {}
    for fmt in args.formats:
        model = Model(quantize_checkpoint(checkpoint, fmt))
        for kv in args.kv:
            for path in ("prompt", "decode") if fmt != "f32" else ("prompt",):
                started = time.perf_counter()
                nll, top1 = score(model, ids, args.window, decode_path=path == "decode", kv=kv)
                elapsed = time.perf_counter() - started
                results[f"{fmt} {path}, {kv} KV"] = (
                    math.exp(nll.mean()),
                    top1,
                    model.checkpoint.nbytes,
                    elapsed,
                )
    if "f32" in args.formats and "f32" not in args.kv:  # the baseline: float32 everywhere
        model = Model(checkpoint)
        nll, top1 = score(model, ids, args.window, decode_path=False, kv="f32")
        results["f32 prompt, f32 KV"] = (math.exp(nll.mean()), top1, model.checkpoint.nbytes, 0.0)

    base = results.get("f32 prompt, f32 KV")
    print(
        f"{folder.name}: {len(ids)} tokens of {TEXT.name}, windows of {args.window}; kernels for {target()}"
    )
    print(
        "path: prompt = float32 activations (prefill), decode = integer activations (decode tokens:"
        " int8 with Q4_1 weights, int16 with Q8_M)"
    )
    print(
        f"{'format, path, KV cache':<24}{'weights MB':>11}{'perplexity':>12}{'vs f32':>9}{'top-1 = f32':>13}{'seconds':>9}"
    )
    for fmt, (ppl, top1, nbytes, seconds) in results.items():
        rel = f"{ppl / base[0] - 1:+.2%}" if base else "-"
        agree = f"{(top1 == base[1]).mean():.2%}" if base else "-"
        print(f"{fmt:<24}{nbytes / 1e6:11.1f}{ppl:12.3f}{rel:>9}{agree:>13}{seconds:9.1f}")


if __name__ == "__main__":
    main()
